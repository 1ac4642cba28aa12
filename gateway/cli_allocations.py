"""`gpu-gateway-client allocate ...`: long-lived keys pinned to servers (docs/allocations.md)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

import click

from gateway.allocations.records import STRATEGIES
from gateway.cli import ADMIN_EPILOG, admin_options, cli, format_rows
from gateway.client import Gateway, GatewayError

ALLOCATION_COLUMNS = ("KEY", "SERVER", "STRATEGY", "GROUP", "LOCATION", "SINCE")
HISTORY_COLUMNS = ("TIME", "TYPE", "SERVER", "FROM", "SCORE", "STRATEGY", "OUTCOME", "REASON")
MOVE_COLUMNS = ("KEY", "FROM", "TO", "GAP", "OUTCOME", "REASON")
NEEDS = {"location": "location", "affinity": "group", "isolation": "group"}  # what each strategy places by

json_option = click.option("--json", "as_json", is_flag=True, help="Print the gateway's raw JSON reply.")


@cli.command(epilog=ADMIN_EPILOG)
@click.argument("key")
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    help="How to pick its server; the gateway's default is load_balance (the lowest load score).",
)
@click.option(
    "--location", metavar="LOCATION", help="The servers' `location` label to pick among (--strategy location)."
)
@click.option("--group", metavar="GROUP", help="The keys to place it beside (affinity) or apart from (isolation).")
@json_option
@admin_options
def allocate(
    gateway: Gateway, key: str, strategy: str | None, location: str | None, group: str | None, as_json: bool
) -> None:
    """Pin KEY to a server with room; a key allocated already stays where it is."""
    needed = NEEDS.get(strategy or "")
    if needed is not None and {"location": location, "group": group}[needed] is None:
        raise click.UsageError(f"--strategy {strategy} needs --{needed}.")
    given = {"key": key, "strategy": strategy, "location": location, "group": group}
    reply = gateway.call("POST", "/allocations", {name: value for name, value in given.items() if value is not None})
    if as_json:
        echo_json(reply)
        return
    data = reply.get("data") or {}
    click.echo(reply.get("message") or f"key {key} allocated to {data.get('server_id', '?')}")
    if data.get("reason"):
        click.echo(f"load score {score_text(data.get('load_score'))}: {data['reason']}")


@cli.command(epilog=ADMIN_EPILOG)
@click.argument("key")
@json_option
@admin_options
def allocation(gateway: Gateway, key: str, as_json: bool) -> None:
    """Show where KEY is pinned, by which strategy, and since when."""
    reply = gateway.call("GET", key_path(key))
    if as_json:
        echo_json(reply)
        return
    click.echo(format_rows(ALLOCATION_COLUMNS, [allocation_row(reply.get("data") or {})]))


@cli.command(epilog=ADMIN_EPILOG)
@click.argument("key")
@json_option
@admin_options
def deallocate(gateway: Gateway, key: str, as_json: bool) -> None:
    """Release KEY: its server's room is free again; its history is kept a week."""
    reply = gateway.call("DELETE", key_path(key))
    if as_json:
        echo_json(reply)
        return
    click.echo(reply.get("message") or f"key {key} released")


@cli.command("allocation-move", epilog=ADMIN_EPILOG)
@click.argument("key")
@click.argument("server_id")
@json_option
@admin_options
def move_allocation(gateway: Gateway, key: str, server_id: str, as_json: bool) -> None:
    """Move KEY to SERVER_ID, which must be up and have room (its history says: manual)."""
    reply = gateway.call("POST", key_path(key, "/move"), {"server_id": server_id})
    if as_json:
        echo_json(reply)
        return
    click.echo(reply.get("message") or f"key {key} moved to {server_id}")


@cli.command(epilog=ADMIN_EPILOG)
@click.option("--server-id", metavar="ID", help="Only the keys of this server.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="The oldest this many.")
@json_option
@admin_options
def allocations(gateway: Gateway, server_id: str | None, limit: int, as_json: bool) -> None:
    """List the allocations, oldest first, with each server's keys and allocation score."""
    query = {"limit": limit} | ({"server_id": server_id} if server_id else {})
    reply = gateway.call("GET", "/allocations?" + urlencode(query))
    if as_json:
        echo_json(reply)
        return
    data = reply.get("data")
    if not isinstance(data, dict):
        raise GatewayError("error: the gateway's reply has no allocation list (no `data` object)")
    rows = [allocation_row(item) for item in data.get("allocations") or [] if isinstance(item, dict)]
    if rows:
        click.echo(format_rows(ALLOCATION_COLUMNS, rows))
    total = data.get("total", len(rows))
    shown = f" ({len(rows)} shown)" if len(rows) != total else ""
    click.echo(f"{total} {'allocation' if total == 1 else 'allocations'}{shown}")
    counts, scores = data.get("counts") or {}, data.get("scores") or {}
    servers = sorted(set(counts) | set(scores))
    if servers:
        click.echo("by server: " + ", ".join(server_count(name, counts, scores) for name in servers))


@cli.command("allocation-history", epilog=ADMIN_EPILOG)
@click.option("--key", required=True, metavar="KEY", help="The key whose moves to show.")
@click.option("--limit", type=click.IntRange(1, 100), default=100, show_default=True, help="The newest this many.")
@json_option
@admin_options
def allocation_history(gateway: Gateway, key: str, limit: int, as_json: bool) -> None:
    """Show a key's moves, oldest first: initial, rebalance, manual and failover, with scores and reasons."""
    reply = gateway.call("GET", "/allocations/history?" + urlencode({"key": key, "limit": limit}))
    if as_json:
        echo_json(reply)
        return
    entries = [entry for entry in (reply.get("data") or {}).get("history") or [] if isinstance(entry, dict)]
    if not entries:
        click.echo(f"key {key} has no history")
        return
    click.echo(format_rows(HISTORY_COLUMNS, [history_row(entry) for entry in entries]))


@cli.command(epilog=ADMIN_EPILOG)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 100),
    metavar="N",
    help="The load gap (0-100) above which keys move; the gateway's default is 30.",
)
@click.option(
    "--max-migrations",
    type=click.IntRange(1, 1000),
    metavar="N",
    help="Move at most this many keys (1-1000); the gateway's default is 10.",
)
@click.option("--dry-run", is_flag=True, help="List the moves it would make, and make none.")
@json_option
@admin_options
def rebalance(
    gateway: Gateway, threshold: float | None, max_migrations: int | None, dry_run: bool, as_json: bool
) -> None:
    """Move keys from the most to the least loaded server while their gap exceeds the threshold."""
    given = {"threshold": threshold, "max_migrations": max_migrations, "dry_run": dry_run or None}
    reply = gateway.call("POST", "/allocations/rebalance", {k: v for k, v in given.items() if v is not None})
    if as_json:
        echo_json(reply)
        return
    data = reply.get("data") or {}
    click.echo(reply.get("message") or "rebalanced")
    moves = [move_row(step) for step in data.get("moves") or [] if isinstance(step, dict)]
    if moves:
        click.echo(format_rows(MOVE_COLUMNS, moves))
    for label, name in (("scores before", "scores_before"), ("scores after", "scores_after")):
        scores = data.get(name)
        if isinstance(scores, dict) and scores:
            click.echo(f"{label}: " + ", ".join(f"{server} {score_text(score)}" for server, score in scores.items()))


def echo_json(reply: dict[str, Any]) -> None:
    click.echo(json.dumps(reply, indent=2, ensure_ascii=False))


def key_path(key: str, action: str = "") -> str:
    """/allocations/<key>[/action], the key quoted so that it stays one path segment."""
    return f"/allocations/{quote(key, safe='')}{action}"


def server_count(server_id: str, counts: dict[str, Any], scores: dict[str, Any]) -> str:
    """`B1 2 keys (score 18)`: a server's keys and its allocation score."""
    count = counts.get(server_id, 0)
    return f"{server_id} {count} {'key' if count == 1 else 'keys'} (score {score_text(scores.get(server_id))})"


def score_text(score: Any) -> str:
    """A load score as `12.5`; `-` when there is none."""
    return f"{score:g}" if isinstance(score, int | float) and not isinstance(score, bool) else "-"


def allocation_row(item: dict[str, Any]) -> tuple[str, ...]:
    """One allocation's table cells."""
    return (
        str(item.get("key", "?")),
        str(item.get("server_id", "?")),
        str(item.get("strategy", "?")),
        str(item.get("group") or "-"),
        str(item.get("location") or "-"),
        str(item.get("created_at") or "?"),
    )


def history_row(entry: dict[str, Any]) -> tuple[str, ...]:
    """One history entry's table cells."""
    return (
        str(entry.get("created_at") or "?"),
        str(entry.get("type", "?")),
        str(entry.get("server_id", "?")),
        str(entry.get("from_server_id") or "-"),
        score_text(entry.get("load_score")),
        str(entry.get("strategy", "?")),
        str(entry.get("outcome", "?")),
        str(entry.get("reason", "")),
    )


def move_row(step: dict[str, Any]) -> tuple[str, ...]:
    """One rebalance move's table cells."""
    return (
        str(step.get("key", "?")),
        str(step.get("from_server_id", "?")),
        str(step.get("to_server_id", "?")),
        score_text(step.get("gap")),
        str(step.get("outcome", "?")),
        str(step.get("reason", "")),
    )
