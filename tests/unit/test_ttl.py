from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

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


def test_due_sorted_soonest_first():
    items = [
        Item("late", T0 + timedelta(seconds=5)),
        Item("early", T0),
        Item("future", T0 + timedelta(hours=1)),
    ]
    assert [i.name for i in ttl.due(items, T0 + timedelta(seconds=10))] == ["early", "late"]


def test_seconds_left_never_negative():
    assert ttl.seconds_left(Item("a", T0), T0 + timedelta(seconds=3)) == 0.0
    assert ttl.seconds_left(Item("a", T0 + timedelta(seconds=3)), T0) == 3.0


def test_minutes_view_rounds_up():
    assert [ttl.ttl_minutes_view(s) for s in (1, 59, 60, 61, 3600)] == [1, 1, 1, 2, 60]
