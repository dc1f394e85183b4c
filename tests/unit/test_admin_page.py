"""The admin page: served public under a strict CSP, then driven in a real headless Chromium
(Debian's, by Playwright) against a live gateway: sign in, create, watch, extend, delete, and a
hostile SSH banner shown as inert text."""

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from playwright.async_api import Locator, Page, async_playwright, expect

from gateway.api.admin_page import UI_DIR
from gateway.core.ports import PortRange
from gateway.gpu.sim import SimBackend
from tests.fakes import SWARM_NODES
from tests.net import bindable_unit_port
from tests.unit.conftest import TOKEN
from tests.unit.helpers import EXAMPLES, connections_written, hello

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
XSS_BANNER = "SSH-2.0-<script>alert(1)</script>"


async def test_page_is_public_and_locked_down(make_client):
    client = await make_client()
    for path, kind in [
        ("/ui", "text/html"),
        ("/ui/app.js", "javascript"),
        ("/ui/style.css", "css"),
    ]:
        resp = await client.get(path, headers={"Authorization": ""})
        assert resp.status == 200, path
        assert kind in resp.headers["Content-Type"]
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/ui/index.html", "/ui/../sessions", "/ui/%2e%2e/sessions", "/ui/x/../../gpus"):
        resp = await client.get(path, headers={"Authorization": ""})
        assert resp.status in (401, 404), path
    resp = await client.get("/sessions", headers={"Authorization": ""})
    assert resp.status == 401


def test_script_never_parses_data_as_html():
    script = (UI_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "<script>" not in (UI_DIR / "index.html").read_text()  # all script is app.js


class Shots:
    """Screenshots go under the test's tmp folder, and to $SANDMAN_UI_SCREENSHOTS if set."""

    def __init__(self, page: Page, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.keep = os.environ.get("SANDMAN_UI_SCREENSHOTS")

    async def __call__(self, name: str) -> None:
        path = self.folder / f"{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        if self.keep:
            await asyncio.to_thread(shutil.copy, path, Path(self.keep) / path.name)


async def sign_in(page: Page) -> None:
    await page.get_by_label("API token").fill(TOKEN)
    await page.get_by_label("API token").press("Enter")  # the keyboard is enough
    await expect(page.locator("#app")).to_be_visible()


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup-host.sh (Debian's chromium)")
    return CHROMIUM


@pytest.fixture
async def browser_page(chromium):
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1366, "height": 768})
            yield await context.new_page()
        finally:
            await browser.close()


class Watched:
    """A page whose dialogs (accepted) and console errors are recorded."""

    def __init__(self, page: Page) -> None:
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []

        async def on_dialog(dialog) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            await dialog.accept()

        page.on("dialog", on_dialog)
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))


async def step_a_wrong_token_is_refused_then_one_signs_in(page: Page, shots: Shots) -> None:
    await page.get_by_label("API token").fill("wrong")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#login-error")).to_have_text(re.compile("refused"))
    await shots("login")
    await sign_in(page)
    unlabelled = await page.evaluate(
        """[...document.querySelectorAll("input, select, textarea")]
             .filter((e) => e.labels.length === 0).map((e) => e.id)"""
    )
    assert unlabelled == []


async def step_create_through_the_form(page: Page, shots: Shots, folder: Path) -> int:
    """With a profile chosen from what the GPUs offer; the private key is offered once.
    Returns the session's port."""
    await page.get_by_label("User").fill("alice")
    await page.get_by_label("Time to live (minutes)").fill("30")
    profile = page.get_by_label("GPU slice")
    await expect(profile.locator("option", has_text="2g.20gb (1 free)")).to_have_count(1)
    await profile.select_option("2g.20gb")
    await page.get_by_role("button", name="Create session").click()
    await expect(page.locator("#created")).to_be_visible()
    command = page.locator("#created-ssh")
    await expect(command).to_have_text(re.compile(r"^ssh -i sandman-alice-\d+\.key -p \d+ "))
    port = int(re.search(r"-p (\d+)", await command.text_content()).group(1))
    await expect(command).to_have_text(
        f"ssh -i sandman-alice-{port}.key -p {port} alice@gpu01.test"
    )
    await expect(page.locator("#created-password")).to_have_text(re.compile(r"\S{20,}"))
    known = re.compile(r"^@cert-authority gpu01\.test,\[gpu01\.test\]:\* ssh-ed25519 ")
    await expect(page.locator("#created-known")).to_have_text(known)
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download private key").click()
    download = await download_info.value
    assert download.suggested_filename == f"sandman-alice-{port}.key"
    key = folder / download.suggested_filename
    await download.save_as(key)
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    await expect(page.locator("#created-key")).to_be_disabled()
    await shots("created")
    return port


async def step_the_list_shows_slice_state_countdown_and_holder(page: Page) -> Locator:
    """Returns alice's row."""
    row = page.locator("#sessions-body tr[data-user=alice]")
    await expect(row).to_contain_text("2g.20gb")
    await expect(row).to_contain_text("running")
    countdown = row.locator(".countdown")
    await expect(countdown).to_have_text(re.compile(r"^29m \d\ds$"))
    before = await countdown.text_content()
    await expect(countdown).not_to_have_text(before)  # it runs
    held = page.locator("#gpus-list .slice.held")
    await expect(held).to_have_count(1)
    await expect(held).to_contain_text("2g.20gb")
    await expect(held).to_contain_text("alice")
    return row


async def step_a_strangers_banner_is_shown_as_text(
    page: Page, shots: Shots, app: web.Application, port: int, row: Locator
) -> None:
    await hello(port, XSS_BANNER.encode())
    await connections_written(app)
    await page.get_by_role("button", name="Connection history of session of alice").click()
    banner = page.locator("#connections-body code", has_text=XSS_BANNER)
    await expect(banner).to_have_count(1)
    assert await banner.text_content() == XSS_BANNER
    assert await page.locator("#connections-body script").count() == 0
    await expect(row).to_contain_text("running")
    await shots("connections")


async def step_extend_by_the_chosen_minutes(page: Page, shots: Shots, row: Locator) -> None:
    await page.get_by_label("Extend by (minutes)").fill("15")
    await page.get_by_role("button", name="Extend session of alice").click()
    await expect(page.locator("#status")).to_have_text(re.compile("now ends"))
    await expect(row.locator(".countdown")).to_have_text(re.compile(r"^44m \d\ds$"))
    # the rows were redrawn; the keyboard focus stayed on the button
    await expect(page.get_by_role("button", name="Extend session of alice")).to_be_focused()
    await expect(page.locator("#audit-body tr").first).to_contain_text("session_extended")
    await page.get_by_role("button", name="Done").click()
    await page.get_by_role("button", name="Close").click()
    await shots("admin")


async def step_delete_after_confirming(page: Page, shots: Shots, row: Locator) -> None:
    await page.get_by_role("button", name="Delete session of alice").click()
    await expect(row).to_have_count(0)
    await expect(page.locator("#sessions-empty")).to_be_visible()
    await expect(page.locator("#gpus-list .slice.held")).to_have_count(0)
    await expect(page.locator("#audit-body tr").first).to_contain_text("session_deleted")
    await shots("deleted")


async def test_admin_page_in_a_browser(make_server, runtime, browser_page, tmp_path):
    """One admin's visit, step by step (each step starts where the last one left the page)."""
    server = await make_server(
        gpu_factory=lambda: SimBackend(EXAMPLES / "topology-mixed.json"),
        default_mig_profile="1g.10gb",
    )
    page, shots, watched = browser_page, Shots(browser_page, tmp_path), Watched(browser_page)
    await page.goto(str(server.make_url("/ui")))

    await step_a_wrong_token_is_refused_then_one_signs_in(page, shots)
    watched.console_errors.clear()  # the refused token's 401 was expected
    port = await step_create_through_the_form(page, shots, tmp_path)
    row = await step_the_list_shows_slice_state_countdown_and_holder(page)
    await step_a_strangers_banner_is_shown_as_text(page, shots, server.app, port, row)
    await step_extend_by_the_chosen_minutes(page, shots, row)
    await step_delete_after_confirming(page, shots, row)
    assert runtime.containers == {}

    assert [d.split(":")[0] for d in watched.dialogs] == ["confirm"]  # the delete; no alert(1)
    assert watched.console_errors == [], watched.console_errors


async def test_create_with_a_public_key_offers_no_private_key(make_server, browser_page, tmp_path):
    server = await make_server()
    page = browser_page
    await asyncio.to_thread(
        subprocess.run,
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bob@laptop", "-f", tmp_path / "id"],
        check=True,
    )
    await page.goto(str(server.make_url("/ui")))
    await sign_in(page)
    await page.get_by_label("User").fill("bob")
    await page.get_by_label("Public key (optional)").fill((tmp_path / "id.pub").read_text())
    await page.get_by_role("button", name="Create session").click()
    await expect(page.locator("#created:visible, #create-error:not(:empty)")).to_have_count(1)
    await expect(page.locator("#create-error")).to_have_text("")
    await expect(page.locator("#created-key")).to_be_hidden()
    await expect(page.locator("#created-ssh")).to_have_text(re.compile(r"-p \d+ bob@gpu01.test$"))
    await expect(page.locator("#created-known")).to_have_text(re.compile("^@cert-authority "))
    how = page.locator("#created-known-how")  # its own file, not ~/.ssh/known_hosts
    await expect(how).to_contain_text("~/.ssh/sandman/known_hosts")
    await expect(how).to_contain_text('"Host gpu01.test"')
    # a host without GPUs says so, rather than "0 free slices"
    await expect(page.locator("#create-profile option").first).to_have_text(
        "Default (no GPU: this host has no GPUs)"
    )
    await expect(page.locator("#gpus-list")).to_have_text(
        "This host has no GPUs: sessions get none."
    )
    # plain Docker: no nodes table, no node column
    await expect(page.locator("#nodes")).to_be_hidden()
    await expect(page.locator("#sessions thead th")).to_have_count(8)
    await expect(page.locator("#sessions thead th:visible")).to_have_count(7)


async def test_admin_page_shows_a_swarms_nodes(make_server, runtime, browser_page):
    runtime.swarm_nodes = SWARM_NODES
    server = await make_server()
    async with ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        resp = await http.post(server.make_url("/sessions"), json={"user_id": "ann"})
        assert resp.status == 201
    page = browser_page
    await page.goto(str(server.make_url("/ui")))
    await sign_in(page)
    worker = page.locator("#nodes-body tr[data-node=worker1]")
    await expect(worker).to_have_text(
        re.compile("worker1.*worker.*ready.*active.*10.0.0.2.*NVIDIA-MIG=MIG-worker-1")
    )
    await expect(page.locator("#nodes-body tr[data-node=manager1]")).to_contain_text(
        "manager1 (gateway)"
    )
    await expect(page.locator("#sessions-node")).to_be_visible()
    await expect(page.locator("#sessions-body tr[data-user=ann] td").nth(4)).to_have_text("worker1")


async def test_admin_page_shows_the_waiting_list(make_server, browser_page):
    port = bindable_unit_port()
    server = await make_server(ssh_ports=PortRange(port, port))  # one port: full at once
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with ClientSession(headers=headers) as http:
        for user in ("ann", "bob"):
            body = {"user_id": user, "wait": True}
            resp = await http.post(server.make_url("/sessions"), json=body)
            assert resp.status == (201 if user == "ann" else 202)
    page = browser_page
    asked: list[str] = []

    async def on_dialog(dialog) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    page.on("dialog", on_dialog)
    await page.goto(str(server.make_url("/ui")))
    await sign_in(page)
    waiting = page.locator("#queue-body tr[data-user=bob]")
    await expect(waiting).to_contain_text("1")
    await expect(page.locator("#queue-empty")).to_be_hidden()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.get_by_role("button", name="Withdraw request of bob").click()
    await expect(page.locator("#status")).to_have_text("Request of bob withdrawn.")
    await expect(waiting).to_have_count(0)
    await expect(page.locator("#queue-empty")).to_be_visible()
    assert asked == ["Withdraw the waiting request of bob?"] and errors == []
