"""The in-container ``sandman-session`` command: what it prints for each kind of session."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

SCRIPT = Path(__file__).parents[2] / "workspace-image" / "session" / "sandman-session"
NOW = datetime(2026, 11, 30, 10, 0, 0, tzinfo=UTC)


def load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("sandman_session", str(SCRIPT))
    spec = importlib.util.spec_from_loader("sandman_session", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


script = load_script()


@pytest.fixture
def local_zone(monkeypatch) -> Iterator[object]:
    """Set the process's local time zone (TZ), restored afterwards."""

    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def info(**overrides) -> dict:
    values = {
        "user": "alice",
        "session_id": "0b6f3f0e-2a41-4a43-9c55-8d0e3c1f2a77",
        "ssh_host": "gpu01.lab",
        "ssh_port": 10001,
        "created_at": "2026-11-30T09:00:00Z",
        "expires_at": "2026-11-30T11:00:00Z",
        "gpu": None,
        "home": "/home/alice",
        "workspace": "/srv/workspaces/alice",
    }
    values.update(overrides)
    return values


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "none: the session has expired and is being ended"),
        (-5, "none: the session has expired and is being ended"),
        (45.9, "45 s"),
        (119, "119 s"),
        (120, "2 min"),
        (3599, "59 min"),
        (3600, "1 h 00 min"),
        (3 * 3600 + 5 * 60 + 59, "3 h 05 min"),
    ],
)
def test_time_left(seconds, text):
    assert script.format_left(seconds) == text


@pytest.mark.parametrize(
    ("gpu", "text"),
    [
        (None, "none: this session has no GPU, so nvidia-smi is not available"),
        (
            {"uuid": "MIG-1f2e3d4c-0000-5555-aaaa-0123456789ab", "profile": "3g.20gb"},
            "MIG slice 3g.20gb, MIG-1f2e3d4c-0000-5555-aaaa-0123456789ab (nvidia-smi -L lists it)",
        ),
        (
            {"uuid": "GPU-7a8b9c0d-1111-2222-3333-444455556666", "profile": None},
            "whole GPU GPU-7a8b9c0d-1111-2222-3333-444455556666 (nvidia-smi shows it)",
        ),
    ],
)
def test_gpu_line(gpu, text):
    assert script.format_gpu(gpu) == text


def test_describe_names_user_expiry_home_and_warning(local_zone):
    local_zone("UTC")
    lines = script.describe(info(), NOW)
    assert lines[0] == "Sandman session of alice"
    text = "\n".join(lines)
    assert "expires    2026-11-30 11:00:00 UTC (also local time; set TZ" in text
    assert "time left  1 h 00 min" in text
    assert "GPU        none: this session has no GPU" in text
    assert "home       /home/alice is persistent (gpu01.lab:/srv/workspaces/alice)" in text
    assert "files outside /home/alice are lost when the session ends" in text
    assert "ssh -p 10001 alice@gpu01.lab" in text


def test_expiry_in_local_time_when_tz_is_set(local_zone):
    local_zone("Europe/Berlin")
    expires = datetime(2026, 11, 30, 11, 0, 0, tzinfo=UTC)
    assert (
        script.format_expiry(expires) == "2026-11-30 11:00:00 UTC = 2026-11-30 12:00:00 CET local"
    )


@pytest.mark.parametrize(
    "broken",
    [{"expires_at": "tomorrow"}, {"expires_at": None}, {"workspace": None}, {"ssh_port": None}],
)
def test_garbled_fields_are_a_clear_error(broken):
    values = {k: v for k, v in info(**broken).items() if v is not None}
    with pytest.raises(script.SessionInfoError, match="lacks or garbles"):
        script.describe(values, NOW)


def test_load_reports_missing_and_invalid_files(tmp_path):
    with pytest.raises(script.SessionInfoError, match="is missing"):
        script.load(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(script.SessionInfoError, match="not hold a JSON object"):
        script.load(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(info()))
    assert script.load(str(good))["user"] == "alice"


def test_load_retries_over_a_rewrite_in_progress(tmp_path, monkeypatch):
    path = tmp_path / "session.json"
    path.write_text('{"user": "al')
    monkeypatch.setattr(
        script, "time", SimpleNamespace(sleep=lambda _: path.write_text(json.dumps(info())))
    )
    assert script.load(str(path))["expires_at"] == "2026-11-30T11:00:00Z"


def test_load_gives_up_on_a_file_that_stays_invalid(tmp_path, monkeypatch):
    path = tmp_path / "session.json"
    path.write_text("{")
    naps: list[float] = []
    monkeypatch.setattr(script, "time", SimpleNamespace(sleep=naps.append))
    with pytest.raises(script.SessionInfoError, match="not valid JSON"):
        script.load(str(path))
    assert len(naps) == script.READ_ATTEMPTS - 1


# --- idle reclaim ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "text"),
    [
        (None, None),
        ({"compute": "gpu", "kept_because": ["connection", "compute_busy"]},
         "kept: a connection is open, the GPU is busy"),
        ({"kept_because": ["hold"], "hold_until": "2026-11-30T12:00:00Z"},
         "kept: held until 12:00 UTC"),
        ({"compute": "cpu", "kept_because": [], "no_connection_since": "2026-11-30T09:10:00Z",
          "compute_idle_since": "2026-11-30T09:20:00Z", "reclaim_at": "2026-11-30T10:20:00Z"},
         "no connection since 09:10 UTC, CPU idle since 09:20 UTC: ends at 10:20 UTC "
         "(sandman-session hold 2h)"),
    ],
)  # fmt: skip
def test_idle_line(facts, text):
    assert script.format_idle(facts) == text


def test_describe_shows_the_idle_line():
    lines = script.describe(info(), NOW, {"kept_because": ["exempt"]})
    assert "  idle       kept: exempt from idle reclaim" in lines


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30m", 1800), ("2h", 7200),
                                               ("1d", 86400)])  # fmt: skip
def test_hold_durations(text, seconds):
    assert script.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5m", "2w", "soon"])
def test_bad_hold_durations(text):
    with pytest.raises(ValueError):
        script.parse_duration(text)


def test_hold_and_release_write_the_hold_file(tmp_path):
    home = info(home=str(tmp_path))
    said = script.hold(["hold", "2h"], home, NOW)
    assert "2026-11-30 12:00:00 UTC" in said
    assert (tmp_path / ".sandman-hold").read_text() == "2026-11-30T12:00:00Z\n"
    script.hold(["release"], home, NOW)
    assert (tmp_path / ".sandman-hold").read_text() == "release\n"
    assert [p.name for p in tmp_path.iterdir()] == [".sandman-hold"]  # no temporary left
