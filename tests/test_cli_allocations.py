"""The CLI's allocation commands, run as a user runs them, against a real gateway and fake servers on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from cli_running import ADMIN, admin_cli, run_cli

BEARER = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def gateway(live_gateway, fake_servers):
    """A live gateway with ADMIN_TOKEN set, and fake servers B1 (location eu) and B2 (location us) up."""
    gateway = live_gateway(admin_token=ADMIN)
    for server_id, location in (("B1", "eu"), ("B2", "us")):
        gateway.register(fake_servers(server_id))
        gateway.manager.update_server(server_id, {"labels": {"location": location}})
    return gateway


def api(gateway, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """The gateway's own reply to a call, made without the CLI."""
    return requests.request(method, gateway.url + path, headers=BEARER, timeout=5, **kwargs).json()


def server_of(gateway, key: str) -> str | None:
    """Where the gateway has the key now; None when it has no allocation."""
    reply = api(gateway, "GET", f"/allocations/{key}")
    return reply["data"]["server_id"] if reply["success"] else None


def cli(gateway, *args: str):
    """One allocation command with the admin token; exit status 0 asserted."""
    result = admin_cli(*args, "--gateway", gateway.url)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_allocate_pins_a_key_and_the_same_key_again_stays(gateway):
    out = cli(gateway, "allocate", "conv-1")

    first, reason = out.splitlines()
    assert first == "key conv-1 allocated to B1"  # both idle: the first registered
    assert reason.startswith("load score 0: the lowest load score of 2 servers with room")
    assert server_of(gateway, "conv-1") == "B1"
    again = cli(gateway, "allocate", "conv-1", "--strategy", "location", "--location", "us")
    assert again.splitlines()[0] == "key conv-1 is allocated to B1 already"
    assert server_of(gateway, "conv-1") == "B1"


@pytest.mark.parametrize(
    ("args", "server_id", "strategy", "group", "location"),
    [
        (["--strategy", "location", "--location", "us"], "B2", "location", None, "us"),
        (["--strategy", "affinity", "--group", "lora-a"], "B2", "affinity", "lora-a", None),
        (["--strategy", "isolation", "--group", "lora-a"], "B1", "isolation", "lora-a", None),
        (["--strategy", "load_balance"], "B1", "load_balance", None, None),
    ],
    ids=["location", "affinity", "isolation", "load_balance"],
)
def test_allocate_sends_the_strategy_and_what_it_places_by(gateway, args, server_id, strategy, group, location):
    # One key of group lora-a on B2 first: affinity joins it there; isolation and load_balance keep to B1.
    seed = {"key": "seed", "strategy": "location", "location": "us", "group": "lora-a"}
    assert api(gateway, "POST", "/allocations", json=seed)["data"]["server_id"] == "B2"

    cli(gateway, "allocate", "k", *args)

    placed = api(gateway, "GET", "/allocations/k")["data"]
    assert (placed["server_id"], placed["strategy"], placed["group"], placed["location"]) == (
        server_id,
        strategy,
        group,
        location,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["allocate", "k", "--strategy", "nearest"], "Invalid value for '--strategy': 'nearest' is not one of"),
        (["allocate", "k", "--strategy", "location"], "--strategy location needs --location."),
        (["allocate", "k", "--strategy", "affinity"], "--strategy affinity needs --group."),
        (["allocate", "k", "--strategy", "isolation", "--location", "eu"], "--strategy isolation needs --group."),
        (["allocations", "--limit", "0"], "Invalid value for '--limit': 0 is not in the range 1<=x<=10000"),
        (["allocation-history"], "Missing option '--key'"),
        (["allocation-history", "--key", "k", "--limit", "101"], "Invalid value for '--limit': 101 is not in the"),
        (["rebalance", "--threshold", "101"], "Invalid value for '--threshold': 101.0 is not in the range 0<=x<=100"),
        (["rebalance", "--threshold", "high"], "Invalid value for '--threshold': 'high' is not a valid float"),
        (["rebalance", "--max-migrations", "0"], "Invalid value for '--max-migrations': 0 is not in the range"),
        (["allocate"], "Missing argument 'KEY'"),
        (["allocation-move", "k"], "Missing argument 'SERVER_ID'"),
    ],
    ids=[
        "strategy", "location-needs", "affinity-needs", "isolation-needs", "limit", "history-key", "history-limit",
        "threshold-range", "threshold-word", "max-migrations", "allocate-key", "move-server",
    ],
)  # fmt: skip
def test_bad_values_are_usage_errors_naming_the_option(gateway, args, expected):
    result = admin_cli(*args, "--gateway", gateway.url)

    assert result.returncode == 2
    assert expected in result.stderr
    assert api(gateway, "GET", "/allocations")["data"]["total"] == 0


def test_allocation_shows_where_a_key_is(gateway):
    cli(gateway, "allocate", "user-7", "--strategy", "location", "--location", "us")

    header, row = cli(gateway, "allocation", "user-7").splitlines()

    assert header.split() == ["KEY", "SERVER", "STRATEGY", "GROUP", "LOCATION", "SINCE"]
    created = api(gateway, "GET", "/allocations/user-7")["data"]["created_at"]
    assert row.split() == ["user-7", "B2", "location", "-", "us", created]


def test_allocations_lists_the_keys_with_each_servers_count_and_score(gateway):
    for key in ("a", "b", "c"):
        cli(gateway, "allocate", key)

    lines = cli(gateway, "allocations").splitlines()

    assert lines[0].split() == ["KEY", "SERVER", "STRATEGY", "GROUP", "LOCATION", "SINCE"]
    assert [line.split()[:2] for line in lines[1:4]] == [["a", "B1"], ["b", "B2"], ["c", "B1"]]
    scores = api(gateway, "GET", "/allocations")["data"]["scores"]
    assert lines[4:] == [
        "3 allocations",
        f"by server: B1 2 keys (score {scores['B1']:g}), B2 1 key (score {scores['B2']:g})",
    ]
    only_b2 = cli(gateway, "allocations", "--server-id", "B2").splitlines()
    assert [line.split()[:2] for line in only_b2[1:-2]] == [["b", "B2"]]
    assert only_b2[-2] == "1 allocation"
    limited = cli(gateway, "allocations", "--limit", "1").splitlines()
    assert limited[-2] == "3 allocations (1 shown)"


def test_allocations_of_none_is_a_count(gateway):
    assert cli(gateway, "allocations").splitlines()[0] == "0 allocations"


def test_history_move_and_deallocate(gateway):
    cli(gateway, "allocate", "conv-9")

    moved = cli(gateway, "allocation-move", "conv-9", "B2")
    assert moved == "key conv-9 moved to B2\n"
    assert server_of(gateway, "conv-9") == "B2"
    header, initial, manual = cli(gateway, "allocation-history", "--key", "conv-9").splitlines()
    assert header.split() == ["TIME", "TYPE", "SERVER", "FROM", "SCORE", "STRATEGY", "OUTCOME", "REASON"]
    assert initial.split()[1:7] == ["initial", "B1", "-", "0", "load_balance", "applied"]
    assert manual.split()[1:4] == ["manual", "B2", "B1"]
    assert manual.endswith("moved by the operator")
    assert len(cli(gateway, "allocation-history", "--key", "conv-9", "--limit", "1").splitlines()) == 2

    released = cli(gateway, "deallocate", "conv-9")
    assert released == "key conv-9 released from B2\n"
    assert server_of(gateway, "conv-9") is None
    assert cli(gateway, "allocation-history", "--key", "nobody") == "key nobody has no history\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["allocation", "gone"], "error 404: no allocation has key gone\n"),
        (["deallocate", "gone"], "error 404: no allocation has key gone\n"),
        (["allocation-move", "gone", "B1"], "error 404: no allocation has key gone\n"),
        (["allocate", "bad key"], "error 400: invalid fields: key\n  key: must be 1-200 characters"),
        (["allocate", "k", "--strategy", "location", "--location", "mars"], "error 400: no server has location 'mars'"),
        (["allocation-history", "--key", "history"], "error 400: invalid fields: key\n  key: 'history' is reserved"),
    ],
    ids=["get", "delete", "move", "bad-key", "unknown-location", "reserved-key"],
)
def test_the_gateways_refusals_are_printed_with_a_non_zero_exit(gateway, args, expected):
    result = admin_cli(*args, "--gateway", gateway.url)

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(expected)


def test_no_server_with_room_says_when_to_retry(gateway):
    for server_id in ("B1", "B2"):
        gateway.manager.set_draining(server_id, True)

    result = admin_cli("allocate", "k", "--gateway", gateway.url)

    assert result.returncode == 1
    assert result.stderr.startswith("error 503: ")
    assert result.stderr.endswith("  the gateway asks to retry after 5 s\n")


def pile_on_b1(gateway, keys: int) -> None:
    """`keys` keys of one group, all on B1 (affinity keeps them together)."""
    for n in range(keys):
        cli(gateway, "allocate", f"k{n}", "--strategy", "affinity", "--group", "g")
    assert {server_of(gateway, f"k{n}") for n in range(keys)} == {"B1"}


def test_rebalance_dry_run_lists_the_moves_and_makes_none(gateway):
    pile_on_b1(gateway, 4)

    lines = cli(gateway, "rebalance", "--dry-run", "--threshold", "10").splitlines()

    planned = api(gateway, "POST", "/allocations/rebalance", json={"threshold": 10, "dry_run": True})["data"]
    assert planned["moves"], planned  # B1 holds every key: there is a gap to close
    assert lines[0] == f"rebalance would move {len(planned['moves'])} keys"
    assert lines[1].split() == ["KEY", "FROM", "TO", "GAP", "OUTCOME", "REASON"]
    rows = [line.split()[:5] for line in lines[2 : 2 + len(planned["moves"])]]
    assert rows == [[m["key"], "B1", "B2", f"{m['gap']:g}", "planned"] for m in planned["moves"]]
    before, after = planned["scores_before"], planned["scores_after"]
    assert lines[-2:] == [
        f"scores before: B1 {before['B1']:g}, B2 {before['B2']:g}",
        f"scores after: B1 {after['B1']:g}, B2 {after['B2']:g}",
    ]
    assert {server_of(gateway, f"k{n}") for n in range(4)} == {"B1"}  # nothing moved


def test_rebalance_moves_keys_within_its_limit(gateway):
    pile_on_b1(gateway, 4)

    lines = cli(gateway, "rebalance", "--threshold", "10", "--max-migrations", "1").splitlines()

    assert lines[0] == "rebalance moved 1 keys"
    assert lines[2].split()[1:5] == ["B1", "B2", "100", "applied"]  # no readings: the share alone, 4 of 4 keys
    assert sorted(server_of(gateway, f"k{n}") for n in range(4)) == ["B1", "B1", "B1", "B2"]


def test_rebalance_without_options_takes_the_gateways_defaults(gateway):
    pile_on_b1(gateway, 1)  # B1 at 100, B2 at 0: moving its one key would only swap their places

    assert cli(gateway, "rebalance").splitlines()[0] == "rebalance moved 0 keys"

    data = json.loads(cli(gateway, "rebalance", "--json"))["data"]
    assert (data["threshold"], data["max_migrations"], data["dry_run"]) == (30.0, 10, False)
    data = json.loads(cli(gateway, "rebalance", "--json", "--threshold", "5.5", "--max-migrations", "3", "--dry-run"))
    assert (data["data"]["threshold"], data["data"]["max_migrations"], data["data"]["dry_run"]) == (5.5, 3, True)


def test_json_prints_the_gateways_raw_reply(gateway):
    placed = json.loads(cli(gateway, "allocate", "conv-1", "--json"))
    stored = api(gateway, "GET", "/allocations/conv-1")["data"]
    assert placed == {
        "success": True,
        "message": "key conv-1 allocated to B1",
        "changed": True,
        "data": {**stored, "load_score": 0.0, "reason": placed["data"]["reason"]},
    }
    assert placed["data"]["reason"].startswith("the lowest load score")
    shown = cli(gateway, "allocation", "conv-1", "--json")
    assert shown.startswith('{\n  "success": true,')
    assert json.loads(shown) == api(gateway, "GET", "/allocations/conv-1")
    listed = json.loads(cli(gateway, "allocations", "--server-id", "B1", "--json"))
    assert listed == api(gateway, "GET", "/allocations?server_id=B1")
    history = json.loads(cli(gateway, "allocation-history", "--key", "conv-1", "--json"))
    assert history == api(gateway, "GET", "/allocations/history?key=conv-1")
    moved = json.loads(cli(gateway, "allocation-move", "conv-1", "B2", "--json"))
    assert (moved["changed"], moved["data"]["server_id"]) == (True, "B2")
    released = json.loads(cli(gateway, "deallocate", "conv-1", "--json"))
    assert released == {"success": True, "message": "key conv-1 released from B2", "data": listed_entry(moved)}


def listed_entry(reply: dict[str, Any]) -> dict[str, Any]:
    """An allocation as GET and DELETE show it: the placement's reply less its score and reason."""
    return {k: v for k, v in reply["data"].items() if k not in ("load_score", "reason")}


@pytest.mark.parametrize(
    "args",
    [
        ["allocate", "k"],
        ["allocation", "k"],
        ["deallocate", "k"],
        ["allocation-move", "k", "B1"],
        ["allocations"],
        ["allocation-history", "--key", "k"],
        ["rebalance"],
    ],
    ids=lambda args: args[0],
)
def test_the_webhook_secret_opens_nothing_once_an_admin_token_is_set(gateway, args):
    result = run_cli(*args, "--gateway", gateway.url)  # --secret only

    assert result.returncode == 1
    assert result.stderr.startswith("error 401: missing or invalid admin token")
    assert api(gateway, "GET", "/allocations")["data"]["total"] == 0


def test_without_an_admin_token_the_webhook_secret_is_used(live_gateway, fake_servers):
    gateway = live_gateway()
    gateway.register(fake_servers("B1"))

    result = run_cli("allocate", "conv-1", "--gateway", gateway.url)

    assert (result.returncode, result.stdout.splitlines()[0]) == (0, "key conv-1 allocated to B1")


def test_a_key_is_quoted_into_its_path(gateway):
    result = admin_cli("deallocate", "a?b#c", "--gateway", gateway.url)

    # Sent as it stands, the gateway would read the key `a` and a query string.
    assert (result.returncode, result.stderr) == (1, "error 404: no allocation has key a?b#c\n")
