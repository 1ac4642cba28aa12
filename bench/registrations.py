"""Durable registrations per second: webhook calls over HTTP, each saved (fsync'd) before the answer."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateways import Gateway, start_gateway
from http_load import JSON_HEADERS, Call, LoadRun, send_all
from nginx_services import GET_PATH, STAND_INS, start_stand_ins
from plan import Plan, say
from processes import HOST, free_port
from wrk_load import run_wrk


@dataclass
class RegistrationRun(LoadRun):
    """One phase of registrations: how many, how fast, and what failed."""

    phase: str = ""
    fleet: int = 0


def register_all(
    port: int,
    phase: str,
    bodies: list[dict[str, Any]],
    clients: int,
    deadline_s: float,
    fleet: int,
) -> RegistrationRun:
    """POST every body to /webhook/register from `clients` threads on kept-alive connections."""
    calls = (Call("POST", "/webhook/register", json.dumps(body).encode(), JSON_HEADERS) for body in bodies)
    run = send_all(port, calls, clients, deadline_s)
    return RegistrationRun(**asdict(run), phase=phase, fleet=fleet)


def registration_bodies(secret: str, count: int, port_of: Callable[[int], int]) -> list[dict[str, Any]]:
    """`count` register calls for servers R00000..., server n at port `port_of(n)`."""
    return [{"server_id": f"R{n:05d}", "ip": HOST, "port": port_of(n), "secret": secret} for n in range(count)]


# -- the suite's registrations part --------------------------------------------------------------


def bench_registrations(folder: Path, plan: Plan) -> dict[str, Any]:
    """Register, move and heartbeat a fleet over HTTP (each change fsync'd first), then proxy beside moves."""
    fleet = plan.registration_fleet
    with contextlib.ExitStack() as stack:
        _, ports = start_stand_ins(folder, stack)
        gateway = start_gateway(folder / "ours", free_port(), {"HEALTH_CHECK_INTERVAL": "3600"}, "ours-reg")
        stack.callback(gateway.stop)

        def run_phase(phase: str, shift: int, clients: int, deadline_s: float) -> dict[str, Any]:
            cpu_before = gateway.service.cpu_seconds()
            bodies = registration_bodies(gateway.secret, fleet, lambda n: ports[(n + shift) % STAND_INS])
            run = register_all(gateway.port, phase, bodies, clients, deadline_s, fleet)
            say(f"  {phase:<34} {run.per_s:8.1f}/s  p50 {run.latency_p50_ms} ms  failures {run.failures or 0}")
            return {**asdict(run), "gateway_cpu_ms_per_call": _per_call_ms(gateway, cpu_before, run.attempted)}

        clients, deadline_s = plan.registration_clients, plan.registration_deadline_s
        phases = [
            run_phase("fill (new servers, 0 -> fleet)", 0, clients, deadline_s),
            run_phase("move (new port, fleet full)", 1, clients, deadline_s),
            run_phase("heartbeat (unchanged: no write)", 1, clients, deadline_s),
        ]
        saved = json.loads((gateway.folder / "backend_servers.json").read_text())
        expected = {f"R{n:05d}": ports[(n + 1) % STAND_INS] for n in range(fleet)}
        moved = sum(1 for entry in saved if expected.get(entry.get("server_id", "")) == entry.get("port"))
        interference = proxy_during_moves(gateway, fleet, ports, plan)
    return {
        "setup": {
            "fleet": fleet,
            "clients": plan.registration_clients,
            "gateway": "The gateway runs as deployed but with HEALTH_CHECK_INTERVAL=3600: no sweep lands in the run",
            "durability": "each change is written to a temp file, fsync'd, renamed and the folder fsync'd",
            "servers": f"all at the {STAND_INS} nginx stand-ins' ports, so each can take proxied traffic",
        },
        "phases": phases,
        "file_check": {"entries": len(saved), "at_moved_port": moved, "ok": len(saved) == fleet and moved == fleet},
        "proxy_during_moves": interference,
    }


def proxy_during_moves(gateway: Gateway, fleet: int, ports: list[int], plan: Plan) -> dict[str, Any]:
    """wrk GETs through the gateway alone, then again while 2 clients keep moving servers."""
    url = gateway.url + GET_PATH
    alone = run_wrk("ours", url, connections=16, duration_s=plan.duration_s, server_cpu=gateway.service.cpu_seconds)
    moves = registration_bodies(gateway.secret, fleet, lambda n: ports[(n + 2) % STAND_INS])
    moving: dict[str, Any] = {}
    mover = threading.Thread(
        target=lambda: moving.update(
            run=register_all(gateway.port, "move under load", moves, 2, plan.duration_s, fleet)
        ),
        daemon=True,
    )
    mover.start()
    try:
        during = run_wrk(
            "ours", url, connections=16, duration_s=plan.duration_s, server_cpu=gateway.service.cpu_seconds
        )
    finally:
        mover.join(plan.duration_s + 40)
    run = moving.get("run")
    for label, result in (("alone", alone), ("during moves", during)):
        latency = f"p50 {result.p50_ms:.1f} ms  p99 {result.p99_ms:.1f} ms"
        say(f"  proxy {label:<13} {result.requests_per_s:8.1f} req/s  {latency}")
    return {
        "wrk": "GET, 16 connections, -t1",
        "alone": alone.as_row(),
        "during_moves": during.as_row(),
        "moves": asdict(run) if run else None,
    }


def _per_call_ms(gateway: Gateway, cpu_before: float, calls: int) -> float | None:
    return round((gateway.service.cpu_seconds() - cpu_before) / calls * 1000, 3) if calls else None
