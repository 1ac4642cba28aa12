"""Config.from_env: defaults, parsing, and errors that name the variable."""

import ipaddress

import pytest

from gateway.config import Config, ConfigError, parse_bind

BASE = {"WEBHOOK_SECRET": "s3cret-value-4e8a1f"}


def test_defaults():
    config = Config.from_env(BASE)
    assert config.webhook_secret == "s3cret-value-4e8a1f"
    assert config.backend_api_base == ""
    assert config.backend_servers_file == "backend_servers.json"
    assert (config.health_check_interval, config.health_check_failures) == (30.0, 3)
    assert (config.health_check_timeout, config.health_check_path) == (5.0, "/health")
    assert config.proxy_prefixes == ("/api/",)
    assert config.max_servers == 10_000
    assert config.registration_binding == "off"
    assert Config.from_env({**BASE, "REGISTRATION_BINDING": "token"}).registration_binding == "token"


def test_secret_is_not_in_repr():
    assert "s3cret-value-4e8a1f" not in repr(Config.from_env(BASE))


@pytest.mark.parametrize("env", [{}, {"WEBHOOK_SECRET": ""}, {"WEBHOOK_SECRET": "   "}])
def test_missing_secret_refuses_to_start_and_says_how(env):
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET") as info:
        Config.from_env(env)
    assert "export WEBHOOK_SECRET" in str(info.value)


@pytest.mark.parametrize("name", ["WEBHOOK_SECRET", "ADMIN_TOKEN", "METRICS_TOKEN", "WORKER_TOKEN"])
@pytest.mark.parametrize("value", ["s", "x" * 15])
def test_a_short_secret_refuses_to_start_and_says_how_to_make_one(name, value):
    # WEBHOOK_SECRET=s made the log redaction turn every letter "s" into [REDACTED].
    with pytest.raises(ConfigError, match=name) as info:
        Config.from_env({**BASE, name: value})
    assert "at least 16" in str(info.value)
    assert "secrets.token_urlsafe(32)" in str(info.value)
    assert "x" * 15 not in str(info.value)  # the message never shows the secret


@pytest.mark.parametrize("name", ["WEBHOOK_SECRET", "ADMIN_TOKEN", "METRICS_TOKEN", "WORKER_TOKEN"])
def test_a_secret_of_16_characters_is_accepted(name):
    config = Config.from_env({**BASE, name: "x" * 16})
    assert getattr(config, name.lower()) == "x" * 16


def test_a_short_secret_given_as_an_override_is_refused_too():
    with pytest.raises(ConfigError, match="ADMIN_TOKEN"):
        Config.from_env(BASE, admin_token="short")


def test_parsed_values():
    config = Config.from_env(
        {
            **BASE,
            "HEALTH_CHECK_INTERVAL": "1",
            "HEALTH_CHECK_FAILURES": "5",
            "HEALTH_CHECK_TIMEOUT": "0.5",
            "HEALTH_CHECK_PATH": "/healthz",
            "BACKEND_API_BASE": "http://fallback.example:8000/",
            "PROXY_PREFIXES": "/api/, /v1/",
            "ALLOWED_BACKEND_NETWORKS": "10.0.0.0/8, fd00::/8",
        }
    )
    assert config.health_check_interval == 1.0
    assert config.health_check_failures == 5
    assert config.health_check_timeout == 0.5
    assert config.health_check_path == "/healthz"
    assert config.backend_api_base == "http://fallback.example:8000"
    assert config.proxy_prefixes == ("/api/", "/v1/")
    assert config.allowed_backend_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HEALTH_CHECK_INTERVAL", "0"),
        ("HEALTH_CHECK_INTERVAL", "abc"),
        ("HEALTH_CHECK_INTERVAL", "nan"),
        ("HEALTH_CHECK_INTERVAL", "inf"),
        ("HEALTH_CHECK_FAILURES", "0"),
        ("HEALTH_CHECK_FAILURES", "2.5"),
        ("HEALTH_CHECK_TIMEOUT", "-1"),
        ("HEALTH_CHECK_PATH", "health"),
        ("BACKEND_API_BASE", "ftp://x"),
        ("BACKEND_API_BASE", "not a url"),
        ("BACKEND_API_BASE", "http://h:1/?q=1"),
        ("PROXY_PREFIXES", "api"),
        ("PROXY_PREFIXES", "/"),
        ("PROXY_PREFIXES", "/webhook/"),
        ("PROXY_MAX_RETRIES", "-1"),
        ("ALLOWED_BACKEND_NETWORKS", "10.0.0.0/33"),
        ("LOG_LEVEL", "LOUD"),
        ("TASK_AFFINITY_TTL", "0"),
        ("TASK_ROUTES", "/api/status/<task_id>"),
        ("TASK_ROUTES", "/api/status/t{task_id}"),
        ("TASK_ROUTES", "api/status/{task_id}"),
        ("TASK_ROUTES", "/api/{task_id}/{task_id}"),
        ("PROXY_HEAD_TIMEOUT", "0"),
        ("CLIENT_BODY_TIMEOUT", "-1"),
        ("CLIENT_MAX_CONNECTIONS", "-1"),
        ("DASHBOARD_SESSION_HOURS", "0"),
        ("DASHBOARD_SESSION_HOURS", "-8"),
        ("DASHBOARD_SESSION_HOURS", "eight"),
        ("DASHBOARD_SESSION_HOURS", "nan"),
        ("DASHBOARD_SESSION_HOURS", "744"),  # the 31 days a dashboard login used to last
        ("DASHBOARD_SECURE_COOKIE", "maybe"),
        ("MAX_SERVERS", "0"),
        ("MAX_SERVERS", "-1"),
        ("MAX_SERVERS", "many"),
        ("REGISTRATION_BINDING", "on"),
        ("REGISTRATION_BINDING", "tokens"),
        ("JOB_STORE_MAX_BYTES", "1000"),
        ("JOB_MAX_ATTEMPTS", "0"),
        ("JOB_LEASE_SECONDS", "0"),
        ("IDEMPOTENCY_TTL", "never"),
        ("QUEUE_WHEN_OFFLINE", "api/enhance"),
        ("JOB_CALLBACK_SECRET", "short"),
        ("JOB_CALLBACK_ATTEMPTS", "0"),
        ("JOB_CALLBACK_BACKOFF", "0"),
        ("WORKER_MAX_LONG_POLLS", "0"),
        ("WORKER_TOKEN", " padded-worker-token-1 "),
    ],
)
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({**BASE, name: value})


@pytest.mark.parametrize(("raw", "hours"), [(None, 8.0), ("0.5", 0.5), ("168", 168.0)])
def test_dashboard_sessions_last_hours(raw, hours):
    env = BASE if raw is None else {**BASE, "DASHBOARD_SESSION_HOURS": raw}
    assert Config.from_env(env).dashboard_session_hours == hours


@pytest.mark.parametrize(("raw", "secure"), [(None, False), ("1", True), ("true", True), ("0", False), ("off", False)])
def test_the_dashboard_cookie_is_secure_on_request(raw, secure):
    env = BASE if raw is None else {**BASE, "DASHBOARD_SECURE_COOKIE": raw}
    assert Config.from_env(env).dashboard_secure_cookie is secure


@pytest.mark.parametrize(
    ("env", "timeout"),
    [
        ({}, 5.0),
        ({"HEALTH_CHECK_INTERVAL": "1"}, 0.8),
        ({"HEALTH_CHECK_INTERVAL": "5"}, 4.0),
        ({"HEALTH_CHECK_INTERVAL": "60"}, 5.0),
        ({"HEALTH_CHECK_INTERVAL": "1", "HEALTH_CHECK_TIMEOUT": " "}, 0.8),
        ({"HEALTH_CHECK_INTERVAL": "1", "HEALTH_CHECK_TIMEOUT": "0.5"}, 0.5),
        ({"HEALTH_CHECK_TIMEOUT": "20"}, 20.0),
    ],
)
def test_an_unset_timeout_follows_the_interval(env, timeout):
    assert Config.from_env({**BASE, **env}).health_check_timeout == timeout


@pytest.mark.parametrize(
    "env",
    [
        {"HEALTH_CHECK_INTERVAL": "5", "HEALTH_CHECK_TIMEOUT": "5"},
        {"HEALTH_CHECK_INTERVAL": "1", "HEALTH_CHECK_TIMEOUT": "5"},
        {"HEALTH_CHECK_TIMEOUT": "30"},
    ],
)
def test_a_timeout_set_at_or_above_the_interval_is_refused(env):
    with pytest.raises(ConfigError, match="HEALTH_CHECK_TIMEOUT"):
        Config.from_env({**BASE, **env})


def test_an_override_of_the_timeout_is_checked_as_set():
    with pytest.raises(ConfigError, match="HEALTH_CHECK_TIMEOUT"):
        Config.from_env({**BASE, "HEALTH_CHECK_INTERVAL": "1"}, health_check_timeout=5.0)
    assert Config.from_env(BASE, health_check_interval=2.0).health_check_timeout == 1.6


def test_credentials_in_the_fallback_url_are_refused():
    with pytest.raises(ConfigError, match=r"BACKEND_API_BASE.*credentials"):
        Config.from_env({**BASE, "BACKEND_API_BASE": "http://user:pw@fallback:8000"})


@pytest.mark.parametrize(("raw", "parsed"), [("127.0.0.1:5000", ("127.0.0.1", 5000)), ("[::1]:8080", ("::1", 8080))])
def test_bind_is_parsed(raw, parsed):
    assert parse_bind(raw) == parsed


@pytest.mark.parametrize("raw", ["localhost", ":5000", "host:port", "host:70000", ""])
def test_bad_bind_names_the_variable(raw):
    with pytest.raises(ConfigError, match="GATEWAY_BIND"):
        parse_bind(raw)


def test_task_routes_and_the_head_timeout():
    config = Config.from_env({**BASE, "TASK_ROUTES": "/api/jobs/{task_id}/result, /v2/t/{task_id}"})
    assert config.task_routes == ("/api/jobs/{task_id}/result", "/v2/t/{task_id}")
    assert Config.from_env({**BASE, "TASK_ROUTES": "off"}).task_routes == ()
    assert config.proxy_head_timeout == 120
    assert Config.from_env({**BASE, "PROXY_READ_TIMEOUT": "30"}).proxy_head_timeout == 30  # unset: never longer
    blank = Config.from_env({**BASE, "PROXY_READ_TIMEOUT": "30", "PROXY_HEAD_TIMEOUT": " "})
    assert blank.proxy_head_timeout == 30  # blank is unset, as for every setting
    set_both = Config.from_env({**BASE, "PROXY_READ_TIMEOUT": "30", "PROXY_HEAD_TIMEOUT": "600"})
    assert set_both.proxy_head_timeout == 600


def test_the_job_settings():
    defaults = Config.from_env(BASE)
    assert (defaults.job_store_file, defaults.job_max_attempts, defaults.queue_when_offline) == ("jobs.db", 3, ())
    config = Config.from_env(
        {
            **BASE,
            "JOB_STORE_FILE": "/var/lib/g/jobs.db",
            "JOB_STORE_MAX_BYTES": "2097152",
            "JOB_QUEUE_TTL": "60",
            "JOB_RESULT_TTL": "120",
            "IDEMPOTENCY_TTL": "30",
            "JOB_MAX_ATTEMPTS": "5",
            "JOB_LEASE_SECONDS": "10",
            "QUEUE_WHEN_OFFLINE": "/api/enhance, /v1/",
        }
    )
    assert config.job_store_file == "/var/lib/g/jobs.db"
    assert (config.job_store_max_bytes, config.job_queue_ttl, config.job_result_ttl) == (2097152, 60, 120)
    assert (config.idempotency_ttl, config.job_max_attempts, config.job_lease_seconds) == (30, 5, 10)
    assert config.queue_when_offline == ("/api/enhance", "/v1/")
    assert (defaults.job_callback_secret, defaults.job_callback_attempts, defaults.job_callback_backoff) == ("", 8, 5)
    callbacks = Config.from_env({**BASE, "JOB_CALLBACK_SECRET": "whsec_" + "A" * 43, "JOB_CALLBACK_ATTEMPTS": "3"})
    assert (callbacks.job_callback_secret, callbacks.job_callback_attempts) == ("whsec_" + "A" * 43, 3)
    assert "whsec_" not in repr(callbacks)


def test_the_pull_worker_settings():
    defaults = Config.from_env(BASE)
    assert (defaults.worker_token, defaults.worker_max_long_polls) == ("", 1000)
    config = Config.from_env({**BASE, "WORKER_TOKEN": "w" * 16, "WORKER_MAX_LONG_POLLS": "5"})
    assert (config.worker_token, config.worker_max_long_polls) == ("w" * 16, 5)
    assert "w" * 16 not in repr(config)


def test_the_redis_settings():
    defaults = Config.from_env(BASE)
    assert (defaults.redis_url, defaults.redis_prefix, defaults.gateway_workers) == ("", "gpu-gateway:", 1)
    url = "rediss://:p4ssw0rd-very-secret@redis.internal:6380/2"
    config = Config.from_env(
        {**BASE, "REDIS_URL": url, "REDIS_PREFIX": "fleet-a:", "GATEWAY_WORKERS": "4", "SLOT_LEASE_SECONDS": "5"}
    )
    assert (config.redis_url, config.redis_prefix, config.gateway_workers) == (url, "fleet-a:", 4)
    assert config.slot_lease_seconds == 5
    assert "p4ssw0rd" not in repr(config)
    assert Config.from_env({**BASE, "REDIS_URL": "unix:///run/redis.sock"}).redis_url == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:6379", "expected redis://"),
        ("redis://", "names no host"),
        ("redis://:hunter2-secret@127.0.0.1:99999/0", "port"),
    ],
)
def test_a_bad_redis_url_is_refused_without_repeating_it(url, problem):
    with pytest.raises(ConfigError) as error:
        Config.from_env({**BASE, "REDIS_URL": url})
    assert "REDIS_URL" in str(error.value) and problem in str(error.value)
    assert url not in str(error.value) and "hunter2" not in str(error.value)


@pytest.mark.parametrize("prefix", ["has space", "a{b}", "x*", "p" * 65])
def test_a_bad_redis_prefix_is_refused(prefix):
    with pytest.raises(ConfigError, match="REDIS_PREFIX"):
        Config.from_env({**BASE, "REDIS_PREFIX": prefix})


def test_more_than_one_worker_needs_redis():
    with pytest.raises(ConfigError, match="GATEWAY_WORKERS=2 needs REDIS_URL"):
        Config.from_env({**BASE, "GATEWAY_WORKERS": "2"})
    assert (
        Config.from_env({**BASE, "GATEWAY_WORKERS": "2", "REDIS_URL": "redis://127.0.0.1:6379/0"}).gateway_workers == 2
    )


def prefix_settings(config: Config) -> tuple:
    return config.prefix_block_size, config.prefix_max_blocks, config.prefix_load_bound, config.prefix_load_slack


def test_the_prefix_routing_settings():
    assert prefix_settings(Config.from_env(BASE)) == (256, 32, 1.25, 4)
    env = {"ROUTING_POLICY": "prefix", "PREFIX_BLOCK_SIZE": "128", "PREFIX_MAX_BLOCKS": "64", "PREFIX_LOAD_BOUND": "1"}
    config = Config.from_env({**BASE, **env, "PREFIX_LOAD_SLACK": "0"})
    assert config.routing_policy == "prefix"
    assert prefix_settings(config) == (128, 64, 1.0, 0)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("ROUTING_POLICY", "prefixed", "expected one of round_robin, least_connections, least_load, prefix"),
        ("PREFIX_BLOCK_SIZE", "8", "expected an integer of at least 16"),
        ("PREFIX_BLOCK_SIZE", "100000", "expected an integer from 16 to 65536"),
        ("PREFIX_BLOCK_SIZE", "2.5", "expected an integer"),
        ("PREFIX_MAX_BLOCKS", "0", "expected an integer of at least 1"),
        ("PREFIX_MAX_BLOCKS", "257", "expected an integer from 1 to 256"),
        ("PREFIX_LOAD_BOUND", "0.9", "expected a finite number of at least 1"),
        ("PREFIX_LOAD_BOUND", "inf", "expected a finite number of at least 1"),
        ("PREFIX_LOAD_SLACK", "-1", "expected an integer of at least 0"),
        ("PREFIX_LOAD_SLACK", "1.5", "expected an integer"),
    ],
)
def test_a_bad_prefix_setting_names_the_variable(name, value, problem):
    with pytest.raises(ConfigError, match=name) as info:
        Config.from_env({**BASE, name: value})
    assert problem in str(info.value)


def test_the_load_bound_and_slack_reach_the_selector(make_app):
    app = make_app(routing_policy="prefix", prefix_load_bound=2.0, prefix_load_slack=7)
    manager = app.extensions["backend_manager"]
    prefix = manager.selector.prefix
    assert (manager.routing_policy, prefix.load_bound, prefix.load_slack) == ("prefix", 2.0, 7)


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        (None, {}),
        ("qwen3:14b=24", {"qwen3:14b": 24.0}),
        ("qwen3:14b=24,llama3:8b=8", {"qwen3:14b": 24.0, "llama3:8b": 8.0}),
        (" qwen3:14b = 24 , llama3:8b=7.5 ,", {"qwen3:14b": 24.0, "llama3:8b": 7.5}),
        ("hf.co/org/model:Q4_K_M=0.5", {"hf.co/org/model:Q4_K_M": 0.5}),
        ("odd=name=3", {"odd=name": 3.0}),  # the last '=' splits: a name may hold one
    ],
)
def test_model_memory_is_parsed(raw, parsed):
    env = BASE if raw is None else {**BASE, "MODEL_MEMORY_GB": raw}
    assert Config.from_env(env).model_memory_gb == parsed


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("qwen3:14b", "model=GB pairs"),
        ("=24", "model=GB pairs"),
        ("has space=24", "model=GB pairs"),
        ("qwen3:14b=big", "not a number"),
        ("qwen3:14b=0", "above 0"),
        ("qwen3:14b=-4", "above 0"),
        ("qwen3:14b=nan", "above 0"),
        ("qwen3:14b=inf", "above 0"),
        ("qwen3:14b=100001", "at most 100000"),
        ("llama3=8,llama3:latest=9", "given twice"),
        (",,", "model=GB pairs"),
    ],
)
def test_a_bad_model_memory_names_the_variable_and_the_problem(raw, problem):
    with pytest.raises(ConfigError, match="MODEL_MEMORY_GB") as refused:
        Config.from_env({**BASE, "MODEL_MEMORY_GB": raw})
    assert problem in str(refused.value)


# -- allocations (docs/allocations.md) ---------------------------------------------------------

SIGNER = {"JOB_CALLBACK_SECRET": "callback-secret-0123456789"}


def test_the_allocation_settings():
    defaults = Config.from_env(BASE)
    assert (defaults.allocation_store_file, defaults.allocation_migrate_url) == ("allocations.db", "")
    assert (defaults.allocation_migrate_timeout, defaults.allocation_failover_seconds) == (10.0, 300.0)
    config = Config.from_env(
        {
            **BASE,
            **SIGNER,
            "ALLOCATION_STORE_FILE": "/var/lib/g/allocations.db",
            "ALLOCATION_MIGRATE_URL": "https://app.example/hooks/allocations",
            "ALLOCATION_MIGRATE_TIMEOUT": "2.5",
            "ALLOCATION_FAILOVER_SECONDS": "0",
        }
    )
    assert config.allocation_store_file == "/var/lib/g/allocations.db"
    assert config.allocation_migrate_url == "https://app.example/hooks/allocations"
    assert (config.allocation_migrate_timeout, config.allocation_failover_seconds) == (2.5, 0.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALLOCATION_MIGRATE_URL", "ftp://app.example/x"),
        ("ALLOCATION_MIGRATE_URL", "http://"),
        ("ALLOCATION_MIGRATE_URL", "http://user:pw@app.example/x"),
        ("ALLOCATION_MIGRATE_URL", "http://app.example:99999/x"),
        ("ALLOCATION_MIGRATE_TIMEOUT", "0"),
        ("ALLOCATION_FAILOVER_SECONDS", "-1"),
        ("ALLOCATION_FAILOVER_SECONDS", "soon"),
    ],
)
def test_a_bad_allocation_setting_names_itself(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({**BASE, **SIGNER, name: value})


def test_the_migrate_webhook_needs_the_signing_secret():
    with pytest.raises(ConfigError, match="ALLOCATION_MIGRATE_URL needs JOB_CALLBACK_SECRET"):
        Config.from_env({**BASE, "ALLOCATION_MIGRATE_URL": "http://127.0.0.1:9000/hooks"})
