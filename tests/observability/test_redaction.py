"""Secrets stay out of log lines: `redact`, `RedactingFilter`, `install`, and the app's wiring."""

from __future__ import annotations

import io
import logging

import pytest
import requests
from conftest import SECRET

from gateway.observability import redaction
from gateway.observability.redaction import REDACTED, RedactingFilter, install, redact


def make_record(msg, *args, name="test"):
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args or None, None)


# -- redact ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /webhook/servers?secret=abc HTTP/1.1", f"GET /webhook/servers?secret={REDACTED} HTTP/1.1"),
        ("/webhook/servers?a=1&secret=abc&b=2", f"/webhook/servers?a=1&secret={REDACTED}&b=2"),
        ("/webhook/servers?a=1&secret=abc", f"/webhook/servers?a=1&secret={REDACTED}"),
        ("secret=abc", f"secret={REDACTED}"),
        ("secret=abc&x=1", f"secret={REDACTED}&x=1"),
        ("query was secret=abc today", f"query was secret={REDACTED} today"),
        ('"GET /x?secret=abc HTTP/1.1" 200', f'"GET /x?secret={REDACTED} HTTP/1.1" 200'),
        ("url='?secret=abc'", f"url='?secret={REDACTED}'"),
        ("/x?SECRET=abc", f"/x?SECRET={REDACTED}"),
        ("/x?Secret=abc&SeCrEt=def", f"/x?Secret={REDACTED}&SeCrEt={REDACTED}"),
        ("/x?secret=a%2Bb%3D", f"/x?secret={REDACTED}"),
        ("/x?secret=&a=1", f"/x?secret={REDACTED}&a=1"),
        ("/x?secret=abc /y?secret=def", f"/x?secret={REDACTED} /y?secret={REDACTED}"),
        ("a\tsecret=abc\nsecret=def", f"a\tsecret={REDACTED}\nsecret={REDACTED}"),
        ("/api/x;secret=abc", f"/api/x;secret={REDACTED}"),  # a matrix parameter
        ("/api/x;secret=abc;v=1/y", f"/api/x;secret={REDACTED};v=1/y"),
        ("/api/x;secret=abc/y", f"/api/x;secret={REDACTED}"),  # the rest may be the value, unescaped
        ("/api/secret=abc", f"/api/secret={REDACTED}"),
        ("/x?token=abc&a=1", f"/x?token={REDACTED}&a=1"),
        ("/x;access_token=abc", f"/x;access_token={REDACTED}"),
        ("/x?client_secret=abc", f"/x?client_secret={REDACTED}"),
        ("/x?api_key=abc&apikey=def&X-Api-Key=ghi", f"/x?api_key={REDACTED}&apikey={REDACTED}&X-Api-Key={REDACTED}"),
        ("/x?password=abc", f"/x?password={REDACTED}"),
    ],
)
def test_redact_replaces_secret_query_values(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no secrets here",
        "/x?secretary=bob",
        "/x?tokens=3&keys=4",
        "/api/x;v=1",
        "/api/token/refresh",
        "/x?a=secret",
        "the secret is safe",
        "",
    ],
)
def test_redact_leaves_other_text_alone(text):
    assert redact(text, [SECRET]) == text


@pytest.mark.parametrize(
    "text",
    [
        SECRET,
        f"token {SECRET}",
        f"prefix{SECRET}suffix",
        f'{{"server_id": "B1", "secret": "{SECRET}"}}',
        f"X-Webhook-Secret: {SECRET}",
        f"Authorization: Bearer {SECRET}",
        f"/webhook/servers?token={SECRET}",
        f"{SECRET} and again {SECRET}",
    ],
)
def test_redact_replaces_the_raw_secret_anywhere(text):
    cleaned = redact(text, [SECRET])

    assert SECRET not in cleaned
    assert REDACTED in cleaned
    assert cleaned.count(REDACTED) == text.count(SECRET)


def test_redact_replaces_every_known_secret():
    cleaned = redact("old-secret-1 then new-secret-2", ["old-secret-1", "new-secret-2"])

    assert cleaned == f"{REDACTED} then {REDACTED}"


def test_redact_ignores_an_empty_secret():
    assert redact("abc", [""]) == "abc"


def test_redact_accepts_any_iterable_of_secrets():
    assert redact(f"a {SECRET}", iter([SECRET])) == f"a {REDACTED}"


# -- RedactingFilter ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "args"),
    [
        ("%s", (f"GET /webhook/servers?secret={SECRET} HTTP/1.1",)),
        ("%s - - [%s] %s", ("127.0.0.1", "date", f'"GET /webhook/servers?a=1&secret={SECRET} HTTP/1.1"')),
        ("presented %r", (SECRET,)),
        ("%(method)s %(url)s", ({"method": "GET", "url": f"/webhook/servers?secret={SECRET}"},)),
        (f"no args, just {SECRET}", ()),
        (f"/x?secret={SECRET}", ()),
    ],
)
def test_filter_redacts_the_final_message(msg, args):
    record = make_record(msg, *args)

    assert RedactingFilter([SECRET]).filter(record) is True

    message = record.getMessage()
    assert SECRET not in message
    assert REDACTED in message
    assert record.args is None


def test_filter_redacts_query_values_without_knowing_the_secret():
    record = make_record("%s", "GET /webhook/servers?secret=a-guess HTTP/1.1")

    RedactingFilter().filter(record)

    assert record.getMessage() == f"GET /webhook/servers?secret={REDACTED} HTTP/1.1"


def test_filter_leaves_a_clean_record_untouched():
    args = ("B1", "http://127.0.0.1:8000")
    record = make_record("registered server %s at %s", *args)

    assert RedactingFilter([SECRET]).filter(record) is True

    assert record.msg == "registered server %s at %s"
    assert record.args == args


def test_filter_handles_a_message_that_is_not_a_string():
    record = make_record(ValueError(f"bad {SECRET}"))

    assert RedactingFilter([SECRET]).filter(record) is True

    assert record.getMessage() == f"bad {REDACTED}"


@pytest.mark.parametrize(
    "path", [f"/api/{SECRET}", f"/api/x;secret={SECRET}", "/api/x;secret=a-guess", "/api/x;token=a-guess/y"]
)
def test_filter_redacts_the_structured_fields(path):
    fields = {"method": "GET", "path": path, "server": "B1", "status": 200, "ms": 1.5}
    record = make_record("request", name="gateway.request")
    record.fields = fields

    assert RedactingFilter([SECRET]).filter(record) is True

    assert REDACTED in record.fields["path"]
    assert "a-guess" not in record.fields["path"] and SECRET not in record.fields["path"]
    assert {**record.fields, "path": None} == {**fields, "path": None}
    assert fields["path"] == path  # the caller's dict is left as it was: a second logger may log it too


def test_filter_redacts_a_field_that_is_not_a_string():
    record = make_record("request")
    record.fields = {"servers": ["B1", f"http://127.0.0.1/?secret={SECRET}"], "count": 2}

    RedactingFilter([SECRET]).filter(record)

    assert record.fields == {"servers": f"['B1', 'http://127.0.0.1/?secret={REDACTED}']", "count": 2}


def test_filter_leaves_clean_fields_as_they_are():
    fields = {"method": "GET", "path": "/api/echo", "servers": ["B1"], "status": 200}
    record = make_record("request")
    record.fields = fields

    RedactingFilter([SECRET]).filter(record)

    assert record.fields is fields


def test_a_filtered_handler_writes_no_secret():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter([SECRET]))
    logger = logging.getLogger("test_log_redaction.direct")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("GET /webhook/servers?secret=%s", SECRET)
        logger.warning("header was %s", SECRET)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    output = stream.getvalue()
    assert SECRET not in output
    assert output.count(REDACTED) == 2


# -- install -----------------------------------------------------------------------------


def redacting_filters(handler):
    return [f for f in handler.filters if isinstance(f, RedactingFilter)]


def test_install_puts_one_filter_on_every_handler():
    logger = logging.getLogger("test_log_redaction.install")
    handlers = [logging.NullHandler(), logging.NullHandler()]
    for handler in handlers:
        logger.addHandler(handler)
    try:
        install([SECRET], [logger])
        install([SECRET, "second"], [logger])
    finally:
        for handler in handlers:
            logger.removeHandler(handler)

    for handler in handlers:
        (only,) = redacting_filters(handler)
        assert set(only.secrets) == {SECRET, "second"}


def test_install_skips_a_logger_without_handlers():
    logger = logging.getLogger("test_log_redaction.empty")

    install([SECRET], [logger])

    assert logger.handlers == []


# -- the app's wiring --------------------------------------------------------------------


@pytest.fixture
def root_output():
    """A handler on the root logger, attached before the app is built; yields what it wrote."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler, stream
    root.removeHandler(handler)


def test_the_app_installs_a_filter_on_the_root_handlers(make_app, root_output):
    handler, _ = root_output

    make_app()

    (only,) = redacting_filters(handler)
    assert SECRET in only.secrets
    assert redaction.RedactingFilter is type(only)


def test_requests_that_carry_the_secret_leave_it_in_no_log_line(make_app, root_output, caplog):
    handler, stream = root_output
    caplog.set_level(logging.INFO)
    app = make_app()
    assert redacting_filters(handler)
    client = app.test_client()
    register = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000}

    replies = [
        client.post("/webhook/register", json={**register, "secret": SECRET}),
        client.post("/webhook/register", json=register, headers={"X-Webhook-Secret": SECRET}),
        client.post("/webhook/register", json=register, headers={"Authorization": f"Bearer {SECRET}"}),
        client.get(f"/webhook/servers?secret={SECRET}"),
        client.post("/webhook/unregister", json={"server_id": "B1", "secret": SECRET}),
    ]
    logging.getLogger("werkzeug").info("%s", "GET /webhook/servers?secret=" + SECRET)
    logging.getLogger("werkzeug").info(
        '%s - - [%s] "%s" %s -', "127.0.0.1", "date", f"GET /webhook/servers?secret={SECRET} HTTP/1.1", 200
    )
    logging.getLogger("gateway").warning("a caller presented %s", SECRET)

    assert [reply.status_code for reply in replies] == [200, 200, 200, 200, 200]
    output = stream.getvalue()
    assert "registered server B1" in output  # the app's own lines were captured
    assert output.count(REDACTED) == 3
    assert SECRET not in output
    assert SECRET not in caplog.text
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_a_real_servers_access_log_has_no_secret(make_app, live_gateway, root_output):
    _, stream = root_output
    gateway = live_gateway(make_app())

    response = requests.get(gateway.url + "/webhook/servers", params={"secret": SECRET}, timeout=5)

    assert response.status_code == 200
    output = stream.getvalue()
    assert "GET /webhook/servers?secret=" + REDACTED in output
    assert SECRET not in output


def test_exception_text_has_no_secret(make_app, root_output):
    _, stream = root_output
    make_app()

    try:
        raise ValueError(f"bad secret {SECRET}")
    except ValueError:
        logging.getLogger("gateway").exception("request failed")

    assert SECRET not in stream.getvalue()
