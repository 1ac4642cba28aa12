"""Metrics, log setup and redaction."""
