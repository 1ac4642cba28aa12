"""The command line a GPU host or an operator uses against the gateway: register, unregister, list."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click
import requests

EXIT_REFUSED = 1  # the gateway answered, but not with success
EXIT_UNREACHABLE = 3  # no answer: refused, unresolvable, or timed out

EPILOG = """\b
Exit status:
  0  the gateway did what was asked
  1  the gateway refused (wrong secret, invalid fields, unknown server),
     or the reply did not come from the gateway
  2  usage error (missing or invalid option)
  3  the gateway could not be reached or did not answer in time

Pass the secret in WEBHOOK_SECRET rather than --secret, so it stays out of the shell history and the
process list.
"""


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
    """The gateway's webhook API, with the secret in the X-Webhook-Secret header."""

    def __init__(self, url: str, secret: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return the JSON reply; raise GatewayError unless it says success."""
        try:
            # No redirects: a custom header would follow one to another host, and a POST would become a GET.
            response = requests.request(
                method,
                self.url + path,
                json=body,
                headers={"X-Webhook-Secret": self.secret},
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


def check_gateway_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Accept only http:// and https:// URLs with a host."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("must be a URL such as https://gateway.example.com or http://127.0.0.1:5000")
    return value


def gateway_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --gateway, --secret and --timeout to a command, and hand it a Gateway built from them."""

    @click.option(
        "--gateway",
        "gateway_url",
        metavar="URL",
        envvar="GATEWAY_URL",
        show_envvar=True,
        required=True,
        callback=check_gateway_url,
        help="The gateway's base URL, e.g. https://gateway.example.com.",
    )
    @click.option(
        "--secret",
        metavar="SECRET",
        envvar="WEBHOOK_SECRET",
        show_envvar=True,
        required=True,
        help="The gateway's webhook secret; prefer the environment variable.",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        default=10.0,
        show_default=True,
        help="Seconds to wait for the gateway.",
    )
    @functools.wraps(command)
    def run(gateway_url: str, secret: str, timeout: float, **kwargs: Any) -> None:
        command(Gateway(gateway_url, secret, timeout), **kwargs)

    return run


@click.group(epilog=EPILOG)
def cli() -> None:
    """Register GPU servers with the gateway, remove them, and list the fleet."""


@cli.command(epilog=EPILOG)
@click.option("--server-id", metavar="ID", required=True, help="The GPU server's id, e.g. B1.")
@click.option(
    "--ip", metavar="ADDRESS", required=True, help="The address the gateway should reach it at (IP or DNS name)."
)
@click.option("--port", metavar="PORT", required=True, type=click.IntRange(1, 65535), help="The port it serves on.")
@gateway_options
def register(gateway: Gateway, server_id: str, ip: str, port: int) -> None:
    """Register a GPU server with the gateway, or update its address."""
    reply = gateway.call("POST", "/webhook/register", {"server_id": server_id, "ip": ip, "port": port})
    click.echo(reply.get("message") or f"server {server_id} registered")


@cli.command(epilog=EPILOG)
@click.option("--server-id", metavar="ID", required=True, help="The GPU server's id, e.g. B1.")
@gateway_options
def unregister(gateway: Gateway, server_id: str) -> None:
    """Remove a GPU server from the gateway's fleet."""
    reply = gateway.call("POST", "/webhook/unregister", {"server_id": server_id})
    click.echo(reply.get("message") or f"server {server_id} unregistered")


@cli.command("list", epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's raw JSON reply.")
@gateway_options
def list_servers(gateway: Gateway, as_json: bool) -> None:
    """List the registered GPU servers and their health."""
    reply = gateway.call("GET", "/webhook/servers")
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    data = reply.get("data")
    if not isinstance(data, dict):
        raise GatewayError("error: the gateway's reply has no server list (no `data` object)")
    servers = [server for server in data.get("servers") or [] if isinstance(server, dict)]
    if servers:
        click.echo(format_table(servers))
    click.echo(summarize(data, len(servers)))


@cli.command("status", epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's raw JSON reply.")
@gateway_options
def show_status(gateway: Gateway, as_json: bool) -> None:
    """Show the gateway's version, uptime, health job, server counts and request totals."""
    reply = gateway.call("GET", "/status")
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    data = reply.get("data") or {}
    check, servers, totals = data.get("health_check") or {}, data.get("servers") or {}, data.get("requests") or {}
    sweep = check.get("last_sweep") or {}
    last = f"last sweep {sweep['time']} took {sweep['duration_s']:.2f} s" if sweep else "no sweep yet"
    by_class = ", ".join(f"{name} {count:g}" for name, count in sorted((totals.get("by_status_class") or {}).items()))
    click.echo(f"version {data.get('version')}, up {data.get('uptime_s')} s, routing {data.get('routing_policy')}")
    click.echo(summarize({**servers, "health_check_running": check.get("running")}, 0))
    click.echo(last)
    click.echo(f"{totals.get('total', 0):g} requests proxied" + (f" ({by_class})" if by_class else ""))


COLUMNS = ("ID", "ADDRESS", "HEALTH", "FAILS", "LAST CHECK", "LAST USED")


def format_table(servers: list[dict[str, Any]]) -> str:
    """The servers as an aligned text table with a header row."""
    rows = [COLUMNS] + [server_row(server) for server in servers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def server_row(server: dict[str, Any]) -> tuple[str, ...]:
    """One server's table cells."""
    ip, port = server.get("ip", "?"), server.get("port", "?")
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return (
        str(server.get("server_id", "?")),
        f"{host}:{port}",
        "healthy" if server.get("is_healthy") else "UNHEALTHY",
        str(server.get("fail_count", 0)),
        server.get("last_check_time") or "never",
        server.get("last_used_time") or "never",
    )


def summarize(data: dict[str, Any], listed: int) -> str:
    """The summary line, e.g. `3 servers: 2 healthy, 1 unhealthy; health checks running`."""
    total = data.get("total_servers", listed)
    noun = "server" if total == 1 else "servers"
    running = "running" if data.get("health_check_running") else "stopped"
    return (
        f"{total} {noun}: {data.get('healthy_servers', 0)} healthy, {data.get('unhealthy_servers', 0)} unhealthy; "
        f"health checks {running}"
    )


if __name__ == "__main__":
    cli()
