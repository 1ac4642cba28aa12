"""Durable jobs: a request kept until a GPU server can run it, run once, its answer kept."""
