"""The command line a GPU host or an operator uses against the gateway: register, list, drain, tune."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import click

from gateway.cli_options import SERVER_FLAGS, monitor_options, server_options
from gateway.client import Gateway, GatewayError

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

ADMIN_EPILOG = """\b
Exit status:
  0  the gateway did what was asked
  1  the gateway refused (wrong token, invalid fields, unknown server),
     or the reply did not come from the gateway
  2  usage error (missing or invalid option)
  3  the gateway could not be reached or did not answer in time

The admin token goes as Authorization: Bearer. Pass it in ADMIN_TOKEN rather than --admin-token,
so it stays out of the shell history and the process list. A gateway without ADMIN_TOKEN accepts
the webhook secret instead (WEBHOOK_SECRET or --secret).
"""


def check_gateway_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Accept only http:// and https:// URLs with a host."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("must be a URL such as https://gateway.example.com or http://127.0.0.1:5000")
    return value


gateway_url_option = click.option(
    "--gateway",
    "gateway_url",
    metavar="URL",
    envvar="GATEWAY_URL",
    show_envvar=True,
    required=True,
    callback=check_gateway_url,
    help="The gateway's base URL, e.g. https://gateway.example.com.",
)
timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    default=10.0,
    show_default=True,
    help="Seconds to wait for the gateway.",
)


def gateway_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --gateway, --secret and --timeout to a command, and hand it a Gateway built from them."""

    @gateway_url_option
    @click.option(
        "--secret",
        metavar="SECRET",
        envvar="WEBHOOK_SECRET",
        show_envvar=True,
        required=True,
        help="The gateway's webhook secret; prefer the environment variable.",
    )
    @timeout_option
    @functools.wraps(command)
    def run(gateway_url: str, secret: str, timeout: float, **kwargs: Any) -> None:
        command(Gateway(gateway_url, secret, timeout), **kwargs)

    return run


def admin_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --gateway, --admin-token, --secret and --timeout, and hand the command an admin Gateway."""

    @gateway_url_option
    @click.option(
        "--admin-token",
        metavar="TOKEN",
        envvar="ADMIN_TOKEN",
        show_envvar=True,
        help="The gateway's admin token; prefer the environment variable.",
    )
    @click.option(
        "--secret",
        metavar="SECRET",
        envvar="WEBHOOK_SECRET",
        show_envvar=True,
        help="Sent instead when no admin token is given; a gateway without ADMIN_TOKEN accepts it.",
    )
    @timeout_option
    @functools.wraps(command)
    def run(gateway_url: str, admin_token: str | None, secret: str | None, timeout: float, **kwargs: Any) -> None:
        credential = admin_token or secret
        if not credential:
            raise click.UsageError(
                "Missing option '--admin-token' (env var: 'ADMIN_TOKEN'); "
                "a gateway without ADMIN_TOKEN takes '--secret' (env var: 'WEBHOOK_SECRET') instead."
            )
        command(Gateway(gateway_url, credential, timeout, bearer=True), **kwargs)

    return run


server_token_option = click.option(
    "--server-token",
    metavar="TOKEN",
    envvar="SERVER_TOKEN",
    show_envvar=True,
    help="The token a gateway with REGISTRATION_BINDING=token gave this id's first registration.",
)


def token_header(server_token: str | None) -> dict[str, str]:
    """The X-Server-Token header when a token is given."""
    return {"X-Server-Token": server_token} if server_token else {}


def server_path(server_id: str, action: str = "") -> str:
    """/admin/servers/<id>[/action], the id quoted so that it stays one path segment."""
    return f"/admin/servers/{quote(server_id, safe='')}{action}"


@click.group(epilog=EPILOG)
def cli() -> None:
    """Register GPU servers with the gateway, list and tune the fleet, and pin allocation keys to servers."""


@cli.command(epilog=EPILOG)
@click.option("--server-id", metavar="ID", required=True, help="The GPU server's id, e.g. B1.")
@click.option(
    "--ip", metavar="ADDRESS", required=True, help="The address the gateway should reach it at (IP or DNS name)."
)
@click.option("--port", metavar="PORT", required=True, type=click.IntRange(1, 65535), help="The port it serves on.")
@monitor_options
@server_options
@server_token_option
@gateway_options
def register(
    gateway: Gateway,
    server_id: str,
    ip: str,
    port: int,
    monitor: dict[str, Any],
    options: dict[str, Any],
    server_token: str | None,
) -> None:
    """Register a GPU server with the gateway, or update its address and the options given."""
    body = {"server_id": server_id, "ip": ip, "port": port, **monitor, **options}
    reply = gateway.call("POST", "/webhook/register", body, token_header(server_token))
    click.echo(reply.get("message") or f"server {server_id} registered")
    if isinstance(reply.get("server_token"), str):  # a gateway that binds ids: shown this once
        click.echo(f"server token (shown once; pass it as --server-token or SERVER_TOKEN): {reply['server_token']}")


@cli.command(epilog=EPILOG)
@click.option("--server-id", metavar="ID", required=True, help="The GPU server's id, e.g. B1.")
@server_token_option
@gateway_options
def unregister(gateway: Gateway, server_id: str, server_token: str | None) -> None:
    """Remove a GPU server from the gateway's fleet."""
    reply = gateway.call("POST", "/webhook/unregister", {"server_id": server_id}, token_header(server_token))
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


@cli.command("status", epilog=ADMIN_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's raw JSON reply.")
@admin_options
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


@cli.command(epilog=ADMIN_EPILOG)
@click.argument("server_id")
@admin_options
def drain(gateway: Gateway, server_id: str) -> None:
    """Send SERVER_ID no new work; requests for its existing tasks still reach it."""
    reply = gateway.call("POST", server_path(server_id, "/drain"))
    click.echo(reply.get("message") or f"server {server_id} draining")


@cli.command(epilog=ADMIN_EPILOG)
@click.argument("server_id")
@admin_options
def enable(gateway: Gateway, server_id: str) -> None:
    """Let a drained SERVER_ID take new work again."""
    reply = gateway.call("POST", server_path(server_id, "/enable"))
    click.echo(reply.get("message") or f"server {server_id} enabled")


@cli.command("reset-token", epilog=ADMIN_EPILOG)
@click.argument("server_id")
@admin_options
def reset_token(gateway: Gateway, server_id: str) -> None:
    """Unbind SERVER_ID from its server token: its next registration binds a new one."""
    reply = gateway.call("POST", server_path(server_id, "/reset-token"))
    click.echo(reply.get("message") or f"server {server_id}'s token is reset")


@cli.command("set", epilog=ADMIN_EPILOG)
@click.argument("server_id")
@server_options
@admin_options
def set_options(gateway: Gateway, server_id: str, options: dict[str, Any]) -> None:
    """Change some of SERVER_ID's routing options; those not given stay as they are."""
    if not options:
        raise click.UsageError(f"Nothing to change: give {', '.join(SERVER_FLAGS[:-1])} or {SERVER_FLAGS[-1]}.")
    reply = gateway.call("PATCH", server_path(server_id), options)
    click.echo(reply.get("message") or f"server {server_id} updated")


@cli.command("priority", epilog=ADMIN_EPILOG)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's raw JSON reply.")
@admin_options
def show_priority(gateway: Gateway, model: str, as_json: bool) -> None:
    """Show which priority tier and which servers would serve MODEL now, and why the others would not."""
    reply = gateway.call("GET", "/admin/server-priority/check/" + quote(model, safe=""))
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    check = reply.get("data") or {}
    tiers = [tier for tier in check.get("tiers") or [] if isinstance(tier, dict)]
    if not check.get("known"):
        click.echo(f"{model}: no registered server serves this model")
    elif check.get("serving_tier") is None:
        click.echo(f"{model}: no server can take it now")
    else:
        click.echo(f"{model}: tier {check['serving_tier']} serves it now")
    rows = [priority_row(tier.get("priority"), server) for tier in tiers for server in tier.get("servers") or []]
    if rows:
        click.echo(format_rows(PRIORITY_COLUMNS, rows))


PRIORITY_COLUMNS = ("TIER", "ID", "STATE", "MODEL", "WEIGHT", "IN FLIGHT")


def priority_row(priority: Any, server: dict[str, Any]) -> tuple[str, ...]:
    """One server's cells in the priority check."""
    limit = server.get("max_concurrent") or "unlimited"
    return (
        str(priority),
        str(server.get("server_id", "?")),
        str(server.get("state", "?")),
        str(server.get("actual_model", "?")),
        str(server.get("weight", "?")),
        f"{server.get('in_flight', 0)}/{limit}",
    )


COLUMNS = (
    "ID",
    "ADDRESS",
    "TYPE",
    "HEALTH",
    "DRAINING",
    "PRIORITY",
    "WEIGHT",
    "MODELS",
    "LOADED",
    "FAILS",
    "LAST CHECK",
    "LAST USED",
)


def format_table(servers: list[dict[str, Any]]) -> str:
    """The servers as an aligned text table with a header row."""
    return format_rows(COLUMNS, [server_row(server) for server in servers])


def format_rows(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    """Rows of cells as an aligned text table under `header`."""
    rows = [header, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
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
        str(server.get("type", "?")),
        "healthy" if server.get("is_healthy") else "UNHEALTHY",
        draining_cell(server.get("draining")),
        str(server.get("priority", "?")),
        str(server.get("weight", "?")),
        model_cell(server),
        loaded_cell(server.get("loaded_models")),
        str(server.get("fail_count", 0)),
        server.get("last_check_time") or "never",
        server.get("last_used_time") or "never",
    )


def draining_cell(draining: Any) -> str:
    """`yes` or `no`; `?` when the gateway does not say."""
    if not isinstance(draining, bool):
        return "?"
    return "yes" if draining else "no"


def model_cell(server: dict[str, Any]) -> str:
    """The models a server answers for, comma-separated; `unknown` when it named none and none were found."""
    models = server.get("served_models", server.get("models"))
    if not isinstance(models, list):
        return "?"  # a gateway that does not say
    return ",".join(str(model) for model in models) or "unknown"


def loaded_cell(loaded: Any) -> str:
    """The models the last sweep found in its memory (Ollama's /api/ps), comma-separated; `-` for none."""
    if not isinstance(loaded, list):
        return "?"  # a gateway that does not say
    names = [str(model.get("name", "?")) for model in loaded if isinstance(model, dict)]
    return ",".join(names) or "-"


def summarize(data: dict[str, Any], listed: int) -> str:
    """The summary line, e.g. `3 servers: 2 healthy, 1 unhealthy; health checks running`."""
    total = data.get("total_servers", listed)
    noun = "server" if total == 1 else "servers"
    running = "running" if data.get("health_check_running") else "stopped"
    return (
        f"{total} {noun}: {data.get('healthy_servers', 0)} healthy, {data.get('unhealthy_servers', 0)} unhealthy; "
        f"health checks {running}"
    )


# The job and allocation commands live in modules of their own and join the group when this one is imported.
from gateway import cli_allocations, cli_jobs  # noqa: E402, F401

if __name__ == "__main__":
    cli()
