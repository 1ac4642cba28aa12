"""The shapes of the gateway's JSON replies, as marshmallow schemas that /openapi.json describes.

The views build their replies as plain dicts; these schemas document them, and the fuzz test
(tests/api/test_openapi_fuzz.py) checks every reply of a live gateway against them. Like every
marshmallow schema they allow no undeclared field (additionalProperties: false), so a field
added to a reply must be added to its schema too.

The pieces every reply shares are here; each area's replies have their own module:
server_replies, routing_replies, status_replies, llm_replies, job_replies and allocation_replies.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields

NULLABLE: dict[str, Any] = {"allow_none": True, "required": True}


class ErrorSchema(Schema):
    """Every error the gateway makes itself: `{"success": false, "message": ..., "errors": ...}`."""

    success = fields.Boolean(required=True, metadata={"enum": [False]})
    message = fields.String(required=True)
    errors = fields.Raw(**NULLABLE, metadata={"description": "each field's messages for a 400; null otherwise"})


class SuccessSchema(Schema):
    """A reply that succeeded."""

    success = fields.Boolean(required=True, metadata={"enum": [True]})
    message = fields.String()
