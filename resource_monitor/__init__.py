"""The resource monitor each GPU or CPU host runs: its readings over HTTP, and its registration with the gateway."""

from resource_monitor.app import create_app

__all__ = ["create_app"]
