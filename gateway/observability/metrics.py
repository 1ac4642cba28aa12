"""Prometheus metrics of the gateway (prometheus_client), and the /metrics endpoint."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.errors import error_response
from gateway.observability.history import LATENCY_BOUNDS, RequestHistory
from gateway.observability.multiprocess import LeftServersFilter, WorkerCollector, multiprocess_dir, values_registry

if TYPE_CHECKING:
    from gateway.cluster.connection import Redis
    from gateway.fleet.health import HealthResult
    from gateway.manager import BackendManager

bp = Blueprint("metrics", __name__)
NO_SERVER = "none"  # the server label of a request no server answered


class FleetCollector(Collector):
    """Up/down and counts, read from the manager at scrape time: a server that leaves is gone."""

    def __init__(self, manager: BackendManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        servers = self.manager.list_servers()
        up = GaugeMetricFamily("gateway_server_up", "1 if the server is healthy, 0 if not", labels=["server"])
        for server in servers:
            up.add_metric([server.server_id], 1.0 if server.is_healthy else 0.0)
        yield up
        yield GaugeMetricFamily("gateway_servers_registered", "Registered servers", value=len(servers))
        yield GaugeMetricFamily(
            "gateway_servers_healthy", "Healthy servers", value=sum(1 for s in servers if s.is_healthy)
        )
        ejected = self.manager.outliers.ejected_ids()
        for name, help_text, value in (
            ("gateway_server_draining", "1 while the server is drained by an operator", lambda s: s.draining),
            (
                "gateway_server_ejected",
                "1 while the server is ejected for consecutive failures",
                lambda s: s.server_id in ejected,
            ),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["server"])
            for server in servers:
                family.add_metric([server.server_id], 1.0 if value(server) else 0.0)
            yield family
        yield GaugeMetricFamily(
            "gateway_queue_waiting", "Requests waiting for a slot under max_concurrent", value=self.manager.queue_length
        )


class RedisCollector(Collector):
    """Whether the last Redis call got through, read at scrape time."""

    def __init__(self, shared: Redis) -> None:
        self.shared = shared

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_redis_up",
            "1 when the last Redis call got through, 0 when not",
            value=1.0 if self.shared.up else 0.0,
        )


class GatewayMetrics:
    """Every metric of one gateway, on its own registry (a fresh one per app, so per test).

    Under several gunicorn workers (PROMETHEUS_MULTIPROC_DIR set), the counters, histograms and
    the in-flight gauge live in the workers' files and a scrape sums them; the collectors that
    read state at scrape time (the fleet, the queues, the allocations, Redis) answer from the scraping worker.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        shared_dir = multiprocess_dir()
        self.multiprocess = shared_dir is not None
        self._summed: LeftServersFilter | None = None
        if shared_dir is None:
            # What the default registry has and a registry of our own lacks: memory, fds, CPU, GC.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        else:
            self._summed = LeftServersFilter(MultiProcessCollector(None, shared_dir), self._kept_server)
            self.registry.register(self._summed)
            PlatformCollector(registry=self.registry)  # python_info: the same in every worker
            self.registry.register(WorkerCollector())
        r = values_registry(self.registry)  # none under several workers: the metrics below go to files
        self.requests = Counter(
            "gateway_requests", "Proxied requests by server, method and status class",
            ["server", "method", "status_class"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time to the last byte of a proxied request", ["server"],
            buckets=LATENCY_BOUNDS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests open to each server", ["server"], registry=r,
            multiprocess_mode="livesum",  # the open requests of the workers alive now
        )  # fmt: skip
        self.health_checks = Counter(
            "gateway_health_checks", "Health checks by server and result", ["server", "result"], registry=r
        )
        self.sweep_duration = Histogram(
            "gateway_health_sweep_duration_seconds", "Time one health sweep takes",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60), registry=r,
        )  # fmt: skip
        self.registrations = Counter("gateway_registrations", "Register calls by result", ["result"], registry=r)
        self.unregistrations = Counter("gateway_unregistrations", "Unregister calls by result", ["result"], registry=r)
        self.retries = Counter(
            "gateway_proxy_retries", "Attempts that failed and moved on, by server", ["server"], registry=r
        )
        self.failovers = Counter(
            "gateway_proxy_failovers", "Requests answered by a server other than the first tried", registry=r
        )
        self.fallback = Counter("gateway_fallback_requests", "Requests answered by BACKEND_API_BASE", registry=r)
        self.no_server = Counter("gateway_no_server_responses", "503s for want of a server", registry=r)
        self.upstream_aborted = Counter(
            "gateway_upstream_aborted", "Answers the server broke off after their head went out", ["server"], registry=r
        )
        self.prefix_routing = Counter(
            "gateway_prefix_routing", "ROUTING_POLICY=prefix choices by result: hit, overloaded, unavailable, miss",
            ["result"], registry=r,
        )  # fmt: skip
        # Each proxied request touches these series; labels() validates and locks on every call,
        # so the children are looked up once per label set (and forgotten when a server leaves).
        self._in_flight_children: dict[str, Gauge] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.history = RequestHistory()  # the dashboard's charts of the last 15 minutes

    def watch(self, manager: BackendManager) -> None:
        """Collect the fleet gauges from `manager`, hear of sweeps and departures, and count its prefix choices."""
        self.registry.register(FleetCollector(manager))
        manager.observers.append(self)
        manager.selector.count_prefix_results(self.prefix_routing.labels)
        self.manager = manager

    # -- what the manager tells ----------------------------------------------------------

    def health_checked(self, results: list[HealthResult], seconds: float) -> None:
        """A sweep finished."""
        self.sweep_duration.observe(seconds)
        for result in results:
            if self._still_registered(result.server_id):  # one that left mid-sweep stays gone
                self.health_checks.labels(result.server_id, "ok" if result.ok else "fail").inc()

    def server_removed(self, server_id: str) -> None:
        """Drop every series of a server that left."""
        metrics = (
            self.requests,
            self.duration,
            self.in_flight,
            self.health_checks,
            self.retries,
            self.upstream_aborted,
        )
        if not self.multiprocess:  # the workers' files keep a series: the scrape filters it out
            for metric in metrics:
                metric.remove_by_labels({"server": server_id})
        self._in_flight_children.pop(server_id, None)
        for key in [key for key in list(self._request_children) if key[0] == server_id]:  # list(): one step
            self._request_children.pop(key, None)
        self.history.forget(server_id)

    # -- what the proxy tells ------------------------------------------------------------

    def request_done(self, server: str, method: str, status: int, seconds: float) -> None:
        """One proxied request ended (its last byte went out, or the client left)."""
        if server not in (NO_SERVER, "fallback") and not self._still_registered(server):
            server = NO_SERVER  # it left while the request ran: do not bring its series back
        key = (server, method, status // 100)
        children = self._request_children.get(key)
        if children is None:
            children = self.requests.labels(server, method, f"{key[2]}xx"), self.duration.labels(server)
            if len(self._request_children) < 10_000:  # methods are a fixed set; servers come and go
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        self.history.record(server, status, seconds)
        if server == "fallback":
            self.fallback.inc()
        elif server == NO_SERVER and status == 503:
            self.no_server.inc()

    def in_flight_of(self, server: str) -> Gauge:
        """The in-flight gauge of one server (or `fallback`)."""
        gauge = self._in_flight_children.get(server)
        if gauge is None:
            gauge = self.in_flight.labels(server)
            if len(self._in_flight_children) < 10_000:
                self._in_flight_children[server] = gauge
        return gauge

    def _still_registered(self, server_id: str) -> bool:
        manager = getattr(self, "manager", None)
        return manager is None or manager.is_registered(server_id)

    def _kept_server(self, server: str) -> bool:
        return server in (NO_SERVER, "fallback") or self._still_registered(server)

    def _request_families(self) -> Iterable[Metric]:
        """gateway_requests as a scrape shows it: this process's, or every worker's summed."""
        if self._summed is None:
            return self.requests.collect()
        return [family for family in self._summed.collect() if family.name == "gateway_requests"]

    def total_requests(self) -> tuple[dict[str, float], dict[str, float]]:
        """Requests so far by status class: those a server answered, and those none did (`server="none"`)."""
        proxied: dict[str, float] = {}
        not_proxied: dict[str, float] = {}
        for family in self._request_families():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals = not_proxied if sample.labels["server"] == NO_SERVER else proxied
                    status_class = sample.labels["status_class"]
                    totals[status_class] = totals.get(status_class, 0.0) + sample.value
        return proxied, not_proxied


@bp.get("/metrics")
def scrape() -> Response:
    """The Prometheus exposition; behind a bearer token when METRICS_TOKEN is set."""
    token = current_app.config["GATEWAY"].metrics_token
    if token:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode("utf-8", "surrogatepass"), token.encode()
        ):
            return error_response(401, "missing or invalid metrics token (Authorization: Bearer <METRICS_TOKEN>)")
    metrics: GatewayMetrics = current_app.extensions["metrics"]
    # content_type, not mimetype: werkzeug would add a second charset to one that has it.
    return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask, manager: BackendManager) -> GatewayMetrics:
    """Create the app's metrics, watch its manager and add /metrics."""
    metrics = GatewayMetrics()
    metrics.watch(manager)
    shared: Redis | None = app.extensions.get("redis")
    if shared is not None:
        metrics.registry.register(RedisCollector(shared))
    app.extensions["metrics"] = metrics
    app.register_blueprint(bp)
    return metrics
