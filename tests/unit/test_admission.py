"""Who gets a full session's slot (pure decisions, tables)."""

from __future__ import annotations

import pytest

from gateway.core.admission import Admission, Slot, admit


def slot(key: str, source: str = "10.0.0.1", silent_since: float = 0.0, kex: bool = False):
    return Slot(key, source, silent_since, kex)


@pytest.mark.parametrize(
    ("live", "limit", "expected"),
    [
        ([], 1, Admission(admit=True)),
        ([slot("a", kex=True)], 2, Admission(admit=True)),  # a slot is free
        ([slot("a", kex=True), slot("b", kex=True)], 2, Admission(admit=False)),  # all logins
        # the most silent of those before their key exchange yields, logins never do
        ([slot("a", silent_since=1, kex=True), slot("b", silent_since=5),
          slot("c", silent_since=3)],
         3, Admission(admit=True, evict="c")),
        # the source holding most waiting slots yields first, even if another is older
        ([slot("a", "10.0.0.9", 1), slot("b", "10.0.0.5", 4), slot("c", "10.0.0.5", 6)],
         3, Admission(admit=True, evict="b")),
        # sources tie: the most silent of the tied ones
        ([slot("a", "10.0.0.9", 3), slot("b", "10.0.0.5", 2), slot("c", "10.0.0.5", 9),
          slot("d", "10.0.0.9", 8)], 4, Admission(admit=True, evict="b")),
        # over the limit already (a lower limit after a restart): still one at a time
        ([slot("a", silent_since=2), slot("b", silent_since=1), slot("c", kex=True)],
         1, Admission(admit=True, evict="b")),
    ],
)  # fmt: skip
def test_admission(live, limit, expected):
    assert admit(live, limit) == expected
