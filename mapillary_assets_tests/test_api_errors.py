import json
import pickle
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from mapillary_assets.api.errors import (
    AuthError,
    MapillaryError,
    PermanentError,
    RequestTooLargeError,
    ThrottledError,
    TransientError,
    UrlExpiredError,
    classify_error,
    parse_retry_after,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize(
    ("status", "body_file", "expected", "transient", "code", "subcode"),
    [
        (403, "error_code_4.json", ThrottledError, True, 4, None),
        (429, "error_code_4.json", ThrottledError, True, 4, None),
        (400, "error_code_17.json", ThrottledError, True, 17, None),
        (403, "error_code_613.json", ThrottledError, True, 613, None),
        (500, "error_code_190.json", AuthError, False, 190, None),
        (401, "error_code_190.json", AuthError, False, 190, None),
        (400, "error_code_100_33.json", PermanentError, False, 100, 33),
        (400, "error_code_100_field.json", PermanentError, False, 100, None),
        (500, "error_code_1.json", RequestTooLargeError, False, 1, None),
        (400, "error_code_-2.json", TransientError, True, -2, 3404014),
    ],
)
def test_classify_by_error_code_not_status(status, body_file, expected, transient, code, subcode):
    error = classify_error(status, fixture(body_file))
    assert type(error) is expected
    assert error.transient is transient
    assert (error.code, error.subcode, error.status) == (code, subcode, status)


@pytest.mark.parametrize(
    ("status", "body", "expected", "transient"),
    [
        (500, b"", TransientError, True),
        (502, b"<html><body>502 Bad Gateway</body></html>", TransientError, True),
        (503, b"Service Unavailable", TransientError, True),
        (504, b"{not json", TransientError, True),
        (429, b"", ThrottledError, True),
        (401, b"", AuthError, False),
        (400, b"", PermanentError, False),
        (404, b"Not Found", PermanentError, False),
        (403, b"URL signature expired", UrlExpiredError, False),
        (403, b"Forbidden", PermanentError, False),
        (408, b"", TransientError, True),
    ],
)
def test_classify_by_status_when_body_says_nothing(status, body, expected, transient):
    error = classify_error(status, body)
    assert type(error) is expected
    assert error.transient is transient
    assert error.code is None and error.status == status


def test_auth_error_message_tells_the_fix():
    error = classify_error(500, fixture("error_code_190.json"))
    assert str(error) == "token rejected (code 190): set MAPILLARY_ACCESS_TOKEN to a valid token"
    assert str(classify_error(401, b"")).startswith("token rejected (code 190)")


def test_unknown_code_falls_back_to_status_and_is_transient_flag():
    def body(code, **extra):
        return json.dumps({"error": {"message": "x", "code": code, **extra}}).encode()

    assert type(classify_error(400, body(12345))) is PermanentError
    assert type(classify_error(500, body(12345))) is TransientError
    assert type(classify_error(400, body(2))) is TransientError  # "service temporarily unavailable"
    assert type(classify_error(400, body(9999, is_transient=True))) is TransientError


def test_retry_after_seconds_and_http_date():
    headers = {"Retry-After": "7"}
    assert classify_error(429, fixture("error_code_4.json"), headers).retry_after == 7.0
    # header names are case-insensitive, even in a plain dict
    assert (
        classify_error(403, fixture("error_code_4.json"), {"retry-after": "2.5"}).retry_after == 2.5
    )
    assert classify_error(403, fixture("error_code_4.json")).retry_after is None
    now = datetime(2024, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == pytest.approx(30)
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") == 0.0


def test_message_carries_the_api_message_and_codes():
    error = classify_error(400, fixture("error_code_100_33.json"))
    assert "code 100/33" in str(error) and "does not exist" in str(error)
    long_body = b"x" * 10_000
    assert len(str(classify_error(502, long_body))) < 400


def test_errors_survive_pickling_and_context():
    error = classify_error(403, fixture("error_code_4.json"), {"Retry-After": "3"})
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is ThrottledError
    assert (restored.code, restored.retry_after, restored.transient, str(restored)) == (
        4,
        3.0,
        True,
        str(error),
    )
    wrapped = error.with_context("GET /tiles/x")
    assert (
        type(wrapped) is ThrottledError
        and wrapped.retry_after == 3.0
        and str(wrapped).endswith("[GET /tiles/x]")
    )
    assert isinstance(wrapped, MapillaryError)
    assert "ThrottledError(" in repr(wrapped)
