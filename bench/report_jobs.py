"""The durable jobs part of docs/benchmarks.md, rendered from the suite's results (bench/jobs_bench.py)."""

from __future__ import annotations

from typing import Any

from report_sections import failed_section, failure_list, ratio_text, table

TITLE = "Durable jobs"


def jobs_section(jobs: dict[str, Any] | None) -> str:
    failed = failed_section(jobs, TITLE)
    if failed or jobs is None:
        return failed or ""
    setup = jobs.get("setup", {})
    parts = [
        f"## {TITLE}\n",
        "bench/jobs_bench.py, on one gateway: "
        + "; ".join(str(setup.get(key, "")) for key in ("gateway", "servers", "job", "clients"))
        + ". Each figure is one run on the shared 2-core machine, where the clients, the fakes and the gateway "
        "compete for the cores: they move by tens of % from run to run.\n",
        _aims(jobs.get("aims", [])),
        _submissions(jobs.get("submissions", [])),
        _first_dispatch(jobs.get("first_dispatch", {})),
        _drain(jobs, setup),
        _lease(jobs.get("lease", {})),
        _memory(jobs.get("memory", [])),
    ]
    return "\n".join(part for part in parts if part)


def _aims(aims: list[dict[str, Any]]) -> str:
    rows = [(aim["aim"], aim["figure"], "**met**" if aim["met"] else "**missed**") for aim in aims]
    return "Issue 14's aims:\n\n" + table(("aim", "this run", "verdict"), rows)


def _submissions(runs: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["clients"],
            r["succeeded"],
            r["per_s"],
            r["latency_p50_ms"],
            r["latency_p99_ms"],
            r.get("gateway_cpu_ms_per_call"),
            r.get("gateway_cores"),
            f"{r.get('queued_before', 0):,} -> {r.get('queued_after', 0):,}",
            failure_list(r.get("failures", {})),
        )
        for r in runs
    ]
    header = ("clients", "202s", "per s", "p50 ms", "p99 ms", "gateway CPU ms/job", "gateway cores", "queued")
    return (
        "### Durable submissions\n\n"
        "`POST` with `Prefer: respond-async`, no server registered: each 202 means the job is committed "
        "(fsynced) in SQLite, and submissions that arrive together share one commit. The 1-client run comes "
        "first; the many-client one adds to the same queue. Gateway cores is the gateway's CPU time over the run's "
        "time: its one worker runs Python on one core at a time (SQLite's commits run in native threads beside "
        "it), so near 1.0 it is bound by its own CPU.\n\n" + table((*header, "failures"), rows)
    )


def _first_dispatch(first: dict[str, Any]) -> str:
    if not first:
        return ""
    rows = [
        (n, s["queued"], s["register_reply_ms"], s["first_request_ms"], s["first_job_ms"])
        for n, s in enumerate(first.get("samples", []), start=1)
    ]
    return (
        "### From a registration to the first dispatch\n\n"
        "With the backlog above queued and no server, a fake GPU server in the bench's own process (so one "
        "clock times both ends) registers with `max_concurrent=1`; from the register call being sent to the fake "
        "reading the head of its first job. Its first request of any kind may be the health check that a "
        "registration starts. After each one the fake is unregistered and stopped, and the next one is new. "
        f"Median **{first.get('median_first_job_ms')} ms** over {first.get('repeats')} "
        f"(max {first.get('max_first_job_ms')} ms; {first.get('missed', 0)} got no job within 10 s).\n\n"
        + table(("repeat", "queued", "register answered ms", "first request ms", "first job ms"), rows)
    )


def _drain(jobs: dict[str, Any], setup: dict[str, Any]) -> str:
    drained, sync = jobs.get("drain", {}), jobs.get("synchronous", {})
    if not drained or not sync:
        return ""
    left = ", ".join(f"{n} {status}" for status, n in drained.get("left", {}).items()) or "none"
    rows = [
        (
            "drain (queued, then 3 servers register)",
            drained.get("jobs"),
            drained.get("seconds"),
            drained.get("jobs_per_s"),
            drained.get("gateway_cpu_ms_per_call"),
            drained.get("gateway_cores"),
            f"{drained.get('failed', 0)} failed, left: {left}",
        ),
        (
            f"synchronous ({sync.get('clients')} clients)",
            sync.get("succeeded"),
            sync.get("seconds"),
            sync.get("per_s"),
            sync.get("gateway_cpu_ms_per_call"),
            sync.get("gateway_cores"),
            failure_list(sync.get("failures", {})),
        ),
    ]
    return (
        "### Draining a backlog, against the same requests sent synchronously\n\n"
        f"The {setup.get('drain_jobs', 0):,} queued jobs (topped up by {setup.get('topped_up_before_drain', 0)} "
        "after the first-dispatch runs took theirs), then the 3 fake GPU servers register: from the first "
        "register call to the last job's `finished_at` in the store. Then the same count of the same request, "
        f"without `Prefer`, from {setup.get('sync_clients')} clients at once (the servers' 3 x max_concurrent), "
        f"through the same gateway to the same servers. The first job started "
        f"{drained.get('first_started_ms')} ms after the first register call. Drain / synchronous: "
        f"**{ratio_text(jobs.get('drain_over_sync'))}**.\n\n"
        + table(("run", "jobs", "seconds", "per s", "gateway CPU ms/job", "gateway cores", "outcome"), rows)
    )


def _lease(lease: dict[str, Any]) -> str:
    if not lease:
        return ""
    failures = failure_list(lease.get("failures", {})) or "none"
    samples = ", ".join(f"{s['after_202_ms']:.2f}" for s in lease.get("samples", []))
    return (
        "### Long-poll lease when a job arrives\n\n"
        "A pull worker waits in `POST /workers/lease` (`wait_seconds=30`) on an empty queue; one job is "
        "submitted; from the client reading its 202 to the worker reading the lease's answer (the gateway wakes "
        "the poll before it answers the submission, so the two race). Median "
        f"**{lease.get('median_after_202_ms')} ms** (max {lease.get('max_after_202_ms')} ms) over "
        f"{lease.get('repeats')}; from the submission being sent, {lease.get('median_after_submit_sent_ms')} ms. "
        f"Each: {samples} ms. Failures: {failures}.\n"
    )


def _memory(memory: list[dict[str, Any]]) -> str:
    if not memory:
        return ""
    rows = [
        (
            m["label"],
            m["jobs"],
            m["rss_mib"],
            m["rss_bytes_per_job"],
            m["store_bytes_per_job"],
            m["files_bytes_per_job"],
            m["store_mib"],
        )
        for m in memory
    ]
    return (
        "### Memory per queued job\n\n"
        f"The gateway worker's RSS (psutil; {memory[0]['rss_before_mib']} MiB before the submissions) and the "
        "job store's size, read after each submission run, over the jobs queued by then. The store's size is "
        "SQLite's (pages x page size, the WAL's pages included); its files on disk include the WAL file, which "
        "keeps its size after a checkpoint. A queued job is a row in SQLite, whose page cache is bounded "
        "(2 MiB by default): the RSS growth is the process's over the runs, divided by the jobs, and need not "
        "grow with them.\n\n"
        + table(
            ("read", "jobs", "RSS MiB", "RSS B/job", "store B/job", "files B/job", "store MiB"),
            rows,
        )
    )
