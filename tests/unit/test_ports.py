import pytest

from gateway.core.ports import PortRange


def test_lowest_free_first():
    assert list(PortRange(10000, 10004).candidates({10000, 10002})) == [10001, 10003, 10004]


def test_all_held_gives_nothing():
    assert list(PortRange(10000, 10001).candidates({10000, 10001})) == []


def test_held_outside_range_ignored():
    assert next(PortRange(10000, 10001).candidates({9999, 20000})) == 10000


def test_membership_and_size():
    ports = PortRange(10000, 20000)
    assert len(ports) == 10001
    assert 10000 in ports and 20000 in ports
    assert 9999 not in ports and 20001 not in ports


@pytest.mark.parametrize(("start", "end"), [(0, 10), (10, 9), (1, 65536)])
def test_invalid_ranges(start, end):
    with pytest.raises(ValueError):
        PortRange(start, end)


@pytest.mark.parametrize(
    ("held", "preferred", "claimed", "expected"),
    [
        # the user's own port first, even when lower ports are free
        (set(), 10003, {10003}, [10003, 10000, 10001, 10002, 10004]),
        # other users' ports only when nothing unclaimed is left, in the order given
        (set(), None, [10001, 10000], [10002, 10003, 10004, 10001, 10000]),
        (set(), 10004, [10000, 10004], [10004, 10001, 10002, 10003, 10000]),
        # a held sticky port is skipped like any other
        ({10004}, 10004, {10004}, [10000, 10001, 10002, 10003]),
        # a sticky port outside the range (the range changed) is ignored
        (set(), 30000, set(), [10000, 10001, 10002, 10003, 10004]),
        # the pool forces a claimed port when it is all that is left
        ({10000, 10001, 10002, 10003}, None, {10004}, [10004]),
    ],
)
def test_sticky_and_claimed_ports(held, preferred, claimed, expected):
    ports = PortRange(10000, 10004)
    assert list(ports.candidates(held, preferred=preferred, claimed=claimed)) == expected
