"""The seed's front door to the webhook API: `register_webhook_routes(app)`.

The code is in `gateway/api/webhook.py`.
"""

from gateway.api.webhook import bp, register_webhook_routes

__all__ = ["bp", "register_webhook_routes"]
