from datetime import UTC, datetime, timedelta

import pytest

from gateway.core import fairshare
from gateway.core.fairshare import UsageRecord, Waiting
from gateway.core.gpu_types import MigProfile

T0 = datetime(2026, 1, 8, tzinfo=UTC)
H = timedelta(hours=1)
DAY = timedelta(days=1)
A100 = "NVIDIA A100-SXM4-80GB"
H200 = "NVIDIA H200"
PROFILES = [
    MigProfile(name, i, slices, slices, slices * 10**10, 7 // slices, A100)
    for i, (name, slices) in enumerate([("1g.10gb", 1), ("3g.40gb", 3), ("7g.80gb", 7)])
] + [
    MigProfile("2g.35gb", 9, 2, 2, 35 * 10**9, 3, H200),
    MigProfile("7g.141gb", 10, 7, 8, 1, 1, H200),
]


@pytest.mark.parametrize(
    ("profile", "fraction"),
    [
        (None, 0.0),  # a GPU-less session
        ("full", 1.0),  # a whole GPU
        ("1g.10gb", 1 / 7),
        ("3g.40gb", 3 / 7),
        ("7g.80gb", 1.0),
        ("2g.35gb", 2 / 7),  # over its own model's slices
        ("4g.99gb", 1.0),  # unknown: the safe side
    ],
)
def test_gpu_fraction(profile, fraction):
    assert fairshare.gpu_fraction(profile, PROFILES) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("record", "hours"),
    [
        (UsageRecord(1.0, T0 - 2 * H, T0 - H), 1.0),
        (UsageRecord(1 / 7, T0 - 7 * H, T0), 1.0),
        (UsageRecord(3 / 7, T0 - 7 * H), 3.0),  # still holding: counted up to now
        (UsageRecord(0.0, T0 - 9 * H, T0), 0.0),  # GPU-less
        (UsageRecord(1.0, T0 - H, T0 + H), 1.0),  # never beyond now
    ],
)
def test_gpu_hours(record, hours):
    assert fairshare.gpu_hours(record, T0) == pytest.approx(hours)


def test_decayed_usage_halves_every_half_life():
    half_life = 7 * DAY
    fresh = [UsageRecord(1.0, T0 - timedelta(seconds=1), T0)]
    old = [UsageRecord(1.0, T0 - half_life - timedelta(seconds=1), T0 - half_life)]
    assert fairshare.decayed_usage(old, T0, half_life) == pytest.approx(
        fairshare.decayed_usage(fresh, T0, half_life) / 2, rel=1e-6
    )


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([], 0.0),
        # an hour just now is almost an hour: h / ln 2 * (1 - 0.5 ** (1 / 168))
        ([UsageRecord(1.0, T0 - H, T0)], 0.99794),
        # the integral over a whole half-life: h / ln 2 * (1 - 1/2)
        ([UsageRecord(1.0, T0 - 7 * DAY, T0)], 168 / (2 * 0.6931471805599453)),
        # two halves of a GPU equal one GPU
        ([UsageRecord(0.5, T0 - H, T0)] * 2, 0.99794),
    ],
)
def test_decayed_usage_integrates_each_interval(records, expected):
    assert fairshare.decayed_usage(records, T0, 7 * DAY) == pytest.approx(expected, rel=1e-4)


def test_queue_order_lowest_usage_then_submission():
    a = Waiting("a", "alice", T0)
    b = Waiting("b", "bob", T0 + H)
    c = Waiting("c", "carol", T0 + 2 * H)
    d = Waiting("d", "dave", T0 + 2 * H)
    usage = {"alice": 5.0, "bob": 1.0}  # carol and dave: none
    assert fairshare.queue_order([a, b, c, d], usage) == [c, d, b, a]
    assert fairshare.queue_order([a, b], {}) == [a, b]
    same = Waiting("z", "zoe", T0)  # submitted with a: arrival order stands
    assert fairshare.queue_order([same, a], {}) == [same, a]


@pytest.mark.parametrize(
    ("candidate_end", "holding", "allowed"),
    [
        (T0 + H, [T0 + 2 * H, T0 + 3 * H], True),  # ends before anything frees
        (T0 + 2 * H, [T0 + 2 * H], True),  # exactly when the first frees
        (T0 + 3 * H, [T0 + 2 * H, T0 + 9 * H], False),  # would still hold when the head fits
        (T0 + H, [], False),  # nothing held: no wait to fill
    ],
)
def test_may_backfill_only_without_delaying_the_head(candidate_end, holding, allowed):
    assert fairshare.may_backfill(candidate_end, holding) is allowed


def test_usage_in_window_counts_only_the_window():
    records = [
        UsageRecord(1.0, T0 - 8 * DAY, T0 - 6 * DAY),  # one day of it in the window
        UsageRecord(3 / 7, T0 - 7 * H),  # running: 3 GPU-hours
        UsageRecord(1.0, T0 - 20 * DAY, T0 - 10 * DAY),  # outside
    ]
    assert fairshare.usage_in_window(records, T0) == pytest.approx(24 + 3)


@pytest.mark.parametrize(
    ("requested", "fraction", "used", "budget", "allowed"),
    [
        (3600, 1.0, 0.0, None, 3600),  # no budget
        (3600, 0.0, 99.0, 1.0, 3600),  # GPU-less costs nothing
        (3600, 1.0, 0.0, 10.0, 3600),  # fits
        (7200, 1.0, 9.5, 10.0, 1800),  # capped to the half hour left
        (7 * 3600, 1 / 7, 9.5, 10.0, 3 * 3600 + 1800),  # a 1g slice stretches it
        (3600, 1.0, 10.0, 10.0, None),  # spent
        (3600, 1.0, 10.0 - 59 / 3600, 10.0, None),  # less than a minute left
        (3600, 1.0, 10.0 - 60 / 3600, 10.0, 60),  # a minute left
    ],
)
def test_ttl_allowed(requested, fraction, used, budget, allowed):
    got = fairshare.ttl_allowed(
        requested_seconds=requested, fraction=fraction, used=used, budget=budget
    )
    assert got == pytest.approx(allowed, abs=1) if allowed is not None else got is None


def test_next_available_when_old_usage_leaves_the_window():
    records = [UsageRecord(1.0, T0 - 7 * DAY, T0 - 7 * DAY + 10 * H)]  # 10 h, a week ago
    assert fairshare.usage_in_window(records, T0) == pytest.approx(10)
    at = fairshare.next_available(records, T0, budget=10.0)
    # a minute of a 1g slice (1/420 GPU-hours) has left the window 8.6 s after now
    assert T0 + timedelta(seconds=8) <= at <= T0 + timedelta(seconds=10)


def test_next_available_counts_a_running_session_until_its_expiry():
    records = [UsageRecord(1.0, T0 - H, T0 + H)]  # the caller gives its expiry: 2 GPU-hours
    at = fairshare.next_available(records, T0, budget=1.0)
    # free again once no more than an hour less 8.6 s of it is in the window
    assert T0 + 7 * DAY + timedelta(seconds=8) <= at <= T0 + 7 * DAY + timedelta(seconds=10)


def test_next_available_is_now_with_room():
    assert fairshare.next_available([UsageRecord(1.0, T0 - H, T0)], T0, budget=2.0) == T0


@pytest.mark.parametrize(
    ("attempts", "error", "after"),
    [
        (0, "container_start_failed", 1),
        (1, "gateway_stopping", 2),
        (2, "container_start_failed", None),  # the third failure ends it
        (2, "no_capacity", 2),  # no node took it: it just waits on
        (0, "no_gpu_available", 0),
    ],
)
def test_attempts_after_a_failed_start(attempts, error, after):
    assert fairshare.MAX_START_ATTEMPTS == 3
    assert fairshare.attempts_after(attempts, error) == after
