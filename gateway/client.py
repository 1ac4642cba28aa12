"""The CLI's client for the gateway's API: one request, its reply checked, and errors click can show."""

from __future__ import annotations

import json
from typing import Any

import click
import requests

EXIT_REFUSED = 1  # the gateway answered, but not with success
EXIT_UNREACHABLE = 3  # no answer: refused, unresolvable, or timed out


class GatewayError(click.ClickException):
    """A request the gateway refused, or a reply that was not the gateway's; exit status 1."""

    exit_code = EXIT_REFUSED

    def show(self, file: Any = None) -> None:
        """Print the message alone to stderr; it already says what failed."""
        click.echo(self.format_message(), err=True)


class GatewayUnreachable(GatewayError):
    """No answer from the gateway; exit status 3."""

    exit_code = EXIT_UNREACHABLE


class Gateway:
    """The gateway's API, with the secret in the X-Webhook-Secret header or, for /admin, as a Bearer token."""

    def __init__(self, url: str, secret: str, timeout: float, bearer: bool = False) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {secret}"} if bearer else {"X-Webhook-Secret": secret}

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Send one request (with `headers` beside the credential) and return the JSON reply.

        Raise GatewayError unless the reply says success.
        """
        try:
            # No redirects: a custom header would follow one to another host, and a POST would become a GET.
            response = requests.request(
                method,
                self.url + path,
                json=body,
                headers={**self.headers, **(headers or {})},
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.ConnectTimeout:
            raise GatewayUnreachable(self.scrub(f"cannot reach gateway at {self.url}: timed out connecting")) from None
        except requests.Timeout:
            raise GatewayUnreachable(
                self.scrub(f"gateway at {self.url} did not answer within {self.timeout:g} s")
            ) from None
        except requests.ConnectionError as exc:
            raise GatewayUnreachable(self.scrub(f"cannot reach gateway at {self.url}: {root_cause(exc)}")) from None
        except requests.RequestException as exc:
            raise GatewayError(self.scrub(f"request to gateway at {self.url} failed: {root_cause(exc)}")) from None
        return self.check_reply(response)

    def check_reply(self, response: requests.Response) -> dict[str, Any]:
        """The reply's JSON object when it says success; otherwise raise GatewayError saying why."""
        status = response.status_code
        if response.is_redirect:
            location = response.headers.get("Location", "")
            raise GatewayError(
                self.scrub(f"error {status}: the gateway redirects to {location}; use that as --gateway")
            )
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            kind = response.headers.get("Content-Type") or "no content type"
            raise GatewayError(
                self.scrub(
                    f"error {status}: the reply from {self.url} is not the gateway's JSON ({kind}); check --gateway"
                )
            )
        if response.ok and payload.get("success") is True:
            return payload
        raise GatewayError(self.scrub(describe_refusal(response, payload)))

    def scrub(self, text: str) -> str:
        """Text with the secret blanked out, should anything ever echo it."""
        return text.replace(self.secret, "[REDACTED]") if self.secret else text


def root_cause(exc: BaseException) -> str:
    """The innermost reason in an exception chain, e.g. "Connection refused"."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


def describe_refusal(response: requests.Response, payload: dict[str, Any]) -> str:
    """The refusal as `error 400: invalid fields: port`, then one indented line per field message."""
    if payload.get("message"):
        message = payload["message"]
    elif response.ok:
        message = "the reply does not say success; is --gateway the gateway's address?"
    else:
        message = response.reason or "no message"
    lines = [f"error {response.status_code}: {message}"]
    lines += [f"  {line}" for line in field_messages(payload.get("errors"))]
    retry_after = response.headers.get("Retry-After")
    if retry_after:
        lines.append(f"  the gateway asks to retry after {retry_after} s")
    return "\n".join(lines)


def field_messages(errors: Any, prefix: str = "") -> list[str]:
    """Flatten marshmallow-style errors ({"port": ["must be ..."]}) into "port: must be ..." lines."""
    if errors is None or errors == {} or errors == []:
        return []
    if isinstance(errors, dict):
        lines = []
        for field in sorted(errors, key=str):
            lines += field_messages(errors[field], f"{prefix}{field}.")
        return lines
    label = prefix.removesuffix(".")
    if isinstance(errors, list) and all(isinstance(item, str) for item in errors):
        text = " ".join(errors)
    else:
        text = errors if isinstance(errors, str) else json.dumps(errors, ensure_ascii=False)
    return [f"{label}: {text}" if label else text]
