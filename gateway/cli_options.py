"""The options a GPU server is registered or tuned with, as `register` and `set` take them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from gateway.allocations.records import LOCATION_LABEL
from gateway.fleet.model_memory import DEVICE_TYPES, MAX_MODEL_GB, is_gigabytes

# What `set` lists when it is given nothing to change.
SERVER_FLAGS = (
    "--weight",
    "--priority",
    "--max-concurrent",
    "--max-allocations",
    "--model",
    "--model-map",
    "--model-memory",
    "--label",
    "--location",
    "--type",
    "--description",
    "--skip-resource-check/--check-resources",
)


def pairs(form: str, empty_values: bool = False) -> Callable[[click.Context, click.Parameter, Any], dict[str, str]]:
    """A callback that turns repeated NAME=VALUE options into a dict, refusing bad forms and repeats."""

    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
        parsed: dict[str, str] = {}
        for item in values:
            name, sep, value = item.partition("=")
            if not sep or not name or not (value or empty_values):
                raise click.BadParameter(f"{item!r} is not of the form {form}")
            if name in parsed:
                raise click.BadParameter(f"{name!r} is given twice")
            parsed[name] = value
        return parsed

    return parse


def gigabytes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, int | float]:
    """Repeated MODEL=GB options as a dict of numbers, each above 0 and at most MAX_MODEL_GB."""
    needs: dict[str, int | float] = {}
    for name, text in pairs("MODEL=GB")(ctx, param, values).items():
        try:
            # An integer goes as one, as the operator wrote it; the gateway keeps the number as sent.
            number: int | float = int(text) if text.isascii() and text.isdecimal() else float(text)
        except ValueError:
            raise click.BadParameter(f"the GB of {name} is not a number: {text!r}") from None
        if not is_gigabytes(number):
            raise click.BadParameter(f"the GB of {name} must be a number above 0 and at most {MAX_MODEL_GB}")
        needs[name] = number
    return needs


def server_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the routing options a server may have, and hand the command the ones given as `options`."""

    @click.option("--weight", type=int, metavar="N", help="Its share of traffic within its priority tier (1-1000).")
    @click.option(
        "--priority", type=int, metavar="N", help="Its tier: 1 is used first, 2 when no tier-1 server can (1-100)."
    )
    @click.option("--max-concurrent", type=int, metavar="N", help="Requests it may hold at once; 0 means no limit.")
    @click.option(
        "--max-allocations", type=int, metavar="N", help="Allocation keys it may hold (0-1000000); 0 means no limit."
    )
    @click.option("--model", "models", multiple=True, metavar="NAME", help="A model it serves; repeat for more.")
    @click.option(
        "--model-map",
        multiple=True,
        metavar="VIRTUAL=ACTUAL",
        callback=pairs("VIRTUAL=ACTUAL"),
        help="Serve the model VIRTUAL as its model ACTUAL; repeat for more.",
    )
    @click.option(
        "--model-memory",
        "model_memory_gb",
        multiple=True,
        metavar="MODEL=GB",
        callback=gigabytes,
        help="The GB of free memory a request for MODEL needs here, e.g. qwen3:14b=24; repeat for more.",
    )
    @click.option(
        "--label",
        "labels",
        multiple=True,
        metavar="KEY=VALUE",
        callback=pairs("KEY=VALUE", empty_values=True),
        help="A label; repeat for more. Labels go as one set: those not given are dropped.",
    )
    @click.option(
        "--location",
        metavar="LOCATION",
        help="Its location (the `location` label the allocations' location strategy reads); joins the --label set.",
    )
    @click.option(
        "--type",
        "device_type",
        type=click.Choice(DEVICE_TYPES, case_sensitive=False),
        help="The kind of box.",
    )
    @click.option("--description", metavar="TEXT", help="A note on the box (up to 1000 characters).")
    @click.option(
        "--skip-resource-check/--check-resources",
        default=None,
        help="Never filter it by its resource monitor's readings, or do again.",
    )
    @functools.wraps(command)
    def run(
        weight: int | None,
        priority: int | None,
        max_concurrent: int | None,
        max_allocations: int | None,
        models: tuple[str, ...],
        model_map: dict[str, str],
        model_memory_gb: dict[str, int | float],
        labels: dict[str, str],
        location: str | None,
        device_type: str | None,
        description: str | None,
        skip_resource_check: bool | None,
        **kwargs: Any,
    ) -> None:
        if location is not None:
            if LOCATION_LABEL in labels:
                raise click.BadParameter(
                    f"give the location once: as --location or as --label {LOCATION_LABEL}=...",
                    param_hint="'--location'",
                )
            labels = {**labels, LOCATION_LABEL: location}
        given = {
            "weight": weight,
            "priority": priority,
            "max_concurrent": max_concurrent,
            "max_allocations": max_allocations,
            "models": list(models) or None,
            "model_map": model_map or None,
            "model_memory_gb": model_memory_gb or None,
            "labels": labels or None,
            "type": device_type.lower() if device_type else None,
            "description": description,
            "skip_resource_check": skip_resource_check,
        }
        command(options={name: value for name, value in given.items() if value is not None}, **kwargs)

    return run


def monitor_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --monitor-port and --monitor-url, and hand the command the one given as `monitor`."""

    @click.option(
        "--monitor-port",
        type=click.IntRange(1, 65535),
        metavar="PORT",
        help="The port of its resource monitor, at --ip.",
    )
    @click.option("--monitor-url", metavar="URL", help="Its resource monitor's http(s) URL, when not at --ip.")
    @functools.wraps(command)
    def run(monitor_port: int | None, monitor_url: str | None, **kwargs: Any) -> None:
        if monitor_port is not None and monitor_url is not None:
            raise click.BadParameter("give --monitor-port or --monitor-url, not both", param_hint="'--monitor-url'")
        monitor: dict[str, Any] = {}
        if monitor_port is not None:
            monitor["monitor_port"] = monitor_port
        if monitor_url is not None:
            monitor["monitor_url"] = monitor_url
        command(monitor=monitor, **kwargs)

    return run
