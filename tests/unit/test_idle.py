from datetime import UTC, datetime, timedelta

import pytest

from gateway.core import idle
from gateway.core.idle import Clocks, IdlePolicy, Keep, Kept, Reading, Reclaim, Warn

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
POLICY = IdlePolicy(no_connection=1800, compute=3600, warnings=(1800, 300), hold_max=86400)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("reading", "mig_unknown", "busy"),
    [
        (Reading(4.9), "busy", False),
        (Reading(5.0), "busy", True),
        (Reading(None, processes=True), "busy", True),  # Ampere MIG, a job runs
        (Reading(None, processes=False), "busy", False),  # Ampere MIG, nothing runs
        (Reading(None, processes=True), "idle", False),  # the operator opted in
        (None, "busy", True),  # unreadable: unknown is not idle
        (None, "idle", True),
    ],
)
def test_is_busy(reading, mig_unknown, busy):
    policy = IdlePolicy(mig_unknown=mig_unknown)
    assert idle.is_busy(reading, 5.0, policy) is busy


@pytest.mark.parametrize(
    ("before", "connections", "last", "busy", "after"),
    [
        # the connection clock starts at the first sample without one
        (Clocks(None, None), 0, None, False, Clocks(at(10), at(10))),
        # ... or at the last connection seen, if the listener saw one
        (Clocks(None, None), 0, at(8), True, Clocks(at(8), None)),
        # an open connection stops it; busy compute stops the other
        (Clocks(at(0), at(0)), 1, at(10), True, Clocks(None, None)),
        # running clocks keep their start
        (Clocks(at(0), at(0)), 0, None, False, Clocks(at(0), at(0))),
        # a short login between two samples restarts the connection clock
        (Clocks(at(0), at(0)), 0, at(9), False, Clocks(at(9), at(0))),
        # a connection seen before the clock started does not move it
        (Clocks(at(5), at(0)), 0, at(4), False, Clocks(at(5), at(0))),
    ],
)
def test_advance(before, connections, last, busy, after):
    got = idle.advance(before, connections=connections, last_connection=last, busy=busy, now=at(10))
    assert got == after


def test_hold_and_exemption_survive_a_sample():
    held = Clocks(at(0), at(0), hold_until=at(90), exempt=True)
    got = idle.advance(held, connections=0, last_connection=None, busy=False, now=at(10))
    assert (got.hold_until, got.exempt) == (at(90), True)


IDLE = Clocks(at(0), at(0))  # nobody, nothing, since T0: due at 60 min


@pytest.mark.parametrize(
    ("clocks", "now", "warned", "decision"),
    [
        (IDLE, at(10), (), Keep((), at(60))),
        (IDLE, at(30), (), Warn(at(60), 1800)),
        (IDLE, at(31), (1800,), Keep((), at(60))),
        (IDLE, at(55), (1800,), Warn(at(60), 300)),
        # a late sample gives only the nearest warning, and never the earlier one after it
        (IDLE, at(56), (), Warn(at(60), 300)),
        (IDLE, at(57), (300,), Keep((), at(60))),
        (IDLE, at(60), (1800, 300), Reclaim(at(60))),
        # the later clock decides: no connection for 30 min, compute idle for only 40
        (Clocks(at(0), at(40)), at(60), (), Keep((), at(100))),
        (Clocks(None, at(0)), at(200), (), Keep((Kept.CONNECTION,), None)),
        (Clocks(at(0), None), at(200), (), Keep((Kept.COMPUTE_BUSY,), None)),
        (Clocks(None, None), at(200), (), Keep((Kept.CONNECTION, Kept.COMPUTE_BUSY), None)),
        (Clocks(at(0), at(0), exempt=True), at(200), (), Keep((Kept.EXEMPT,), None)),
        # a hold keeps it; after the hold, every warning still comes before the reclaim
        (Clocks(at(0), at(0), hold_until=at(120)), at(100), (), Keep((Kept.HOLD,), None)),
        (Clocks(at(0), at(0), hold_until=at(120)), at(120), (), Warn(at(150), 1800)),
        (Clocks(at(0), at(0), hold_until=at(120)), at(150), (1800, 300), Reclaim(at(150))),
        # a hold that ended long ago does not delay anything
        (Clocks(at(0), at(0), hold_until=at(-100)), at(60), (), Reclaim(at(60))),
    ],
)
def test_decide(clocks, now, warned, decision):
    assert idle.decide(clocks, POLICY, now, warned) == decision


@pytest.mark.parametrize(
    ("minutes", "expected"),
    [(0, None), (1, at(1)), (1440, at(1440))],
)
def test_hold_until(minutes, expected):
    assert idle.hold_until(minutes, T0, POLICY) == expected


@pytest.mark.parametrize("minutes", [-1, 1441])
def test_hold_out_of_bounds_is_refused(minutes):
    with pytest.raises(ValueError, match="idle_hold_minutes"):
        idle.hold_until(minutes, T0, POLICY)


@pytest.mark.parametrize(
    ("until", "written", "expected"),
    [
        (None, at(0), None),  # the file releases
        (at(120), at(0), at(120)),
        (at(5000), at(0), at(1440)),  # bounded from when it was written
        (at(5000), at(99999), at(10 + 1440)),  # a future mtime counts as now
    ],
)
def test_file_hold(until, written, expected):
    assert idle.file_hold(until, written, at(10), POLICY) == expected


def test_warning_says_why_and_what_to_do():
    text = idle.warning_message(Clocks(at(0), at(5)), at(60), "gpu")
    assert "no connection since 12:00:00" in text
    assert "GPU idle since 12:05:00" in text
    assert "13:00:00 UTC" in text
    assert "sandman-session hold" in text
