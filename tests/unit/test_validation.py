import pytest

from gateway.core.validation import (
    parse_duration,
    ttl_seconds_from,
    validate_image,
    validate_user_id,
)
from gateway.errors import ImageNotAllowed, InvalidTtl, InvalidUserId


@pytest.mark.parametrize("user_id", ["user123", "a", "_svc", "alice-b", "x" * 32, "a_1-2"])
def test_valid_user_ids(user_id):
    assert validate_user_id(user_id) == user_id


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "A",
        "Alice",
        "../x",
        "a/b",
        "1abc",
        "-a",
        "x" * 33,
        "root",
        "sshd",
        "nobody",
        "daemon",
        "a b",
        "ä",
        "a.b",
        "a\n",
    ],
)
def test_invalid_user_ids(user_id):
    with pytest.raises(InvalidUserId):
        validate_user_id(user_id)


@pytest.mark.parametrize(
    ("minutes", "seconds", "expected"),
    [(None, None, 3600), (1, None, 60), (120, None, 7200), (None, 5, 5), (None, 7200, 7200)],
)
def test_ttl_resolution(minutes, seconds, expected):
    assert ttl_seconds_from(minutes, seconds, default_minutes=60, max_minutes=120) == expected


@pytest.mark.parametrize(
    ("minutes", "seconds"), [(0, None), (-1, None), (121, None), (None, 0), (None, 7201), (1, 1)]
)
def test_ttl_rejected(minutes, seconds):
    with pytest.raises(InvalidTtl):
        ttl_seconds_from(minutes, seconds, default_minutes=60, max_minutes=120)


def test_image_allow_list():
    assert validate_image(None, default="ws", allowed=()) == "ws"
    assert validate_image("ws", default="ws", allowed=()) == "ws"
    assert validate_image("other:1", default="ws", allowed=("other:1",)) == "other:1"
    with pytest.raises(ImageNotAllowed):
        validate_image("evil", default="ws", allowed=("other:1",))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("10m", 600), ("1h", 3600), ("1d", 86400), ("0.5m", 30), ("0", 0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "ten", "-1", "5w", "1mm"])
def test_parse_duration_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)
