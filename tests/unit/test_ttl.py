from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from gateway.core import ttl

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Item:
    name: str
    expires_at: datetime


def test_expires_at_adds_seconds():
    assert ttl.expires_at(T0, 90) == T0 + timedelta(seconds=90)


def test_expiry_boundary_is_inclusive():
    item = Item("a", T0)
    assert not ttl.is_expired(item, T0 - timedelta(microseconds=1))
    assert ttl.is_expired(item, T0)


def test_minutes_view_rounds_up():
    assert [ttl.ttl_minutes_view(s) for s in (1, 59, 60, 61, 3600)] == [1, 1, 1, 2, 60]


def test_warning_schedule_only_future_soonest_first():
    expires = T0 + timedelta(minutes=30)
    got = ttl.warning_schedule(expires, [600, 60, 3600, 0], T0)
    assert got == [expires - timedelta(minutes=10), expires - timedelta(minutes=1)]
    late = ttl.warning_schedule(expires, [600, 60], expires - timedelta(minutes=5))
    assert late == [expires - timedelta(minutes=1)]


def test_warning_message_says_when():
    expires = T0 + timedelta(minutes=10)
    text = ttl.warning_message(expires, T0)
    assert "10 minutes" in text and "00:10:00 UTC" in text
    assert "1 minute " in ttl.warning_message(expires, expires - timedelta(seconds=60))
    assert "5 seconds" in ttl.warning_message(expires, expires - timedelta(seconds=5))


def _extend(now_offset=0, **kw):
    values = dict(new_total_seconds=None, extend_seconds=None, max_seconds=7200)
    values.update(kw)
    return ttl.extended_ttl(
        created_at=T0, current_ttl_seconds=600, now=T0 + timedelta(seconds=now_offset), **values
    )


def test_extended_ttl():
    assert _extend(extend_seconds=300) == 900
    assert _extend(new_total_seconds=3600) == 3600
    assert _extend(new_total_seconds=7200) == 7200


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"extend_seconds": 60, "new_total_seconds": 60},
        {"extend_seconds": 0},
        {"extend_seconds": 6601},
        {"new_total_seconds": 7201},
        {"new_total_seconds": 100, "now_offset": 100},
        {"new_total_seconds": 0},
        {"new_total_seconds": -(10**17)},  # beyond what a date can hold
        {"new_total_seconds": -60 * 10**20},
        {"extend_seconds": -(10**17)},
        {"extend_seconds": 10**30},
    ],
)
def test_extended_ttl_refused(kw):
    with pytest.raises(ValueError):
        _extend(**kw)
