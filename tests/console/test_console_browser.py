"""The console driven in a real headless Chromium (Debian's ``chromium``, through Playwright):
sign in, browse to a session, verify a chain, export and download a bundle that the CLI verifies
offline, explain a request, sign out; a client key cannot sign in; a cross-site POST is refused;
hostile recorded HTML stays text; a scoped auditor cannot open another tenant's page by URL.

Screenshots of every page land in a scratch folder; with ``SESSIONGATE_SCREENSHOTS=DIR`` they land
in DIR instead (``tests/console/screenshots``, linked from the README, is refreshed that way), so a
test run never rewrites tracked files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import ACME_KEY, AUDITOR_TOKEN, REPO, Gateway, _Server
from tests.console.conftest import SCOPED_TOKEN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
README_SHOTS = Path(__file__).parent / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped with the reason where it is missing, but a failure under CI
    (where .ci/run installs it), so the browser tests never pass without running."""
    if CHROMIUM is None:
        message = "Chromium is not installed (.ci/run installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this run's screenshots go (see the module docstring)."""
    chosen = os.environ.get("SESSIONGATE_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shot(folder: Path, page: Any, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0, f"no screenshot written to {path}"


def sign_in(page: Any, gateway: Gateway, token: str) -> None:
    page.goto(f"{gateway.url}/console")
    page.fill("#token", token)
    page.click("button[type=submit]")


def test_auditor_walkthrough(browser: Any, shots: Path, console_gateway: Gateway, tmp_path: Path) -> None:
    """Sign in, browse, verify, export, download, verify offline, explain, sign out."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{console_gateway.url}/console")
    assert page.url.endswith("/console/login")
    shot(shots, page, "01-sign-in")
    sign_in(page, console_gateway, AUDITOR_TOKEN)
    assert page.url.endswith("/console/overview"), page.content()
    assert page.locator("h2", has_text="Tenant acme").count() == 1
    shot(shots, page, "02-overview")

    page.click("text=Browse sessions >> nth=0")
    page.wait_for_selector("table caption")
    shot(shots, page, "03-sessions")
    page.click("text=console-a")
    page.wait_for_selector("article.round")
    contents = page.locator("pre.content").all_text_contents()
    assert any("<script>window.__pwned=1</script>" in c for c in contents)
    assert any('"><img src=x onerror="window.__pwned=2">' in c for c in contents)
    assert page.evaluate("window.__pwned") is None and page.locator("main img").count() == 0
    shot(shots, page, "04-session")
    page.click("text=request >> nth=0")
    page.wait_for_selector("text=Entry #")
    shot(shots, page, "05-audit-entry")

    page.goto(f"{console_gateway.url}/console/overview")
    page.click("button:has-text('Verify chain') >> nth=0")
    page.wait_for_selector("#verify-result", timeout=20_000)
    assert "is intact" in page.text_content("#verify-result")
    shot(shots, page, "06-verify")

    page.goto(f"{console_gateway.url}/console/overview")
    page.click("summary:has-text('Export') >> nth=0")
    page.select_option("select[name=format] >> nth=0", "jsonl")
    page.click("button:has-text('Start export') >> nth=0")
    page.wait_for_selector("#download", timeout=20_000)
    shot(shots, page, "07-export")
    with page.expect_download() as info:
        page.click("#download")
    bundle = tmp_path / info.value.suggested_filename
    info.value.save_as(bundle)
    with page.expect_download() as key_info:
        page.click("text=Download the public key")
    public_key = tmp_path / "sessiongate-audit.pub"
    key_info.value.save_as(public_key)
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "bundle", filter="data")
    manifest = next((tmp_path / "bundle").glob("*.manifest.json"))
    verified = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--bundle", str(manifest),
                               "--public-key", str(public_key)], capture_output=True, text=True, cwd=tmp_path,
                              timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    page.goto(f"{console_gateway.url}/console/policies")
    page.fill("#x-session", "support:42")
    page.fill("#x-request", '{"model": "gpt-4o", "messages": [{"role": "user", "content": "ticket T-1"}]}')
    page.click("button:has-text('Explain')")
    page.wait_for_selector("#explain-report")
    assert "support-tickets" in page.text_content("#explain-report")
    shot(shots, page, "08-policies")

    page.click("button:has-text('Sign out')")
    assert page.url.endswith("/console/login")
    page.goto(f"{console_gateway.url}/console/overview")
    assert page.url.endswith("/console/login")
    context.close()


def test_a_client_key_cannot_sign_in(browser: Any, shots: Path, console_gateway: Gateway) -> None:
    """The login form refuses a client key with a message that says why."""
    page = browser.new_page()
    sign_in(page, console_gateway, ACME_KEY)
    assert page.url.endswith("/console/login")
    assert "client keys cannot" in page.text_content("[role=alert]")
    shot(shots, page, "09-client-key-refused")
    page.close()


def test_a_cross_site_post_is_refused(browser: Any, console_gateway: Gateway) -> None:
    """A page on another origin that posts to the console (auto-submitted form) is refused, and the
    auditor stays signed in."""
    target = f"{console_gateway.url}/console/logout"

    async def evil(request: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=(
            f'<form id="f" method="post" action="{target}"><input name="csrf" value="guess"></form>'
            '<script>document.getElementById("f").submit()</script>'))

    app = web.Application()
    app.router.add_get("/", evil)
    server = _Server(app)
    context = browser.new_context()
    page = context.new_page()
    try:
        sign_in(page, console_gateway, AUDITOR_TOKEN)
        with page.expect_navigation(url=target):
            page.goto(f"http://127.0.0.1:{server.port}/")
        assert "Request refused" in page.content()
        page.goto(f"{console_gateway.url}/console/overview")
        assert page.url.endswith("/console/overview")  # the forged sign-out did nothing
    finally:
        context.close()
        server.stop()


def test_a_scoped_auditor_cannot_open_another_tenants_page(browser: Any, shots: Path, console_gateway: Gateway) -> None:
    """globex's auditor typing acme's session URL gets the 'not your tenant' page."""
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, console_gateway, SCOPED_TOKEN)
    response = page.goto(f"{console_gateway.url}/console/sessions/acme/console-a")
    assert response is not None and response.status == 403
    assert "Not your tenant" in page.text_content("h1")
    assert "second turn" not in page.content()
    shot(shots, page, "10-scoped-refused")
    context.close()


def test_screenshots_folder_is_linked_from_the_readme() -> None:
    """The README points at the tracked screenshots, which hold every page the walkthrough shoots,
    and says how to refresh them."""
    readme = (REPO / "README.md").read_text()
    assert "tests/console/screenshots" in readme and "SESSIONGATE_SCREENSHOTS" in readme
    assert {p.stem for p in README_SHOTS.glob("*.png")} >= {"01-sign-in", "06-verify", "10-scoped-refused"}


def test_a_hostile_role_cannot_hide_its_message(browser: Any, shots: Path, console_gateway: Gateway) -> None:
    """A recorded role that names stylesheet classes ('user skip': the skip link's off-screen
    class) leaves its message on screen, marked as an unrecognised role, where it used to be
    moved off-screen; no message's class comes from recorded data."""
    import httpx

    document = {"id": "role-import", "memo": None,
                "session_settings": {"max_length": 12000, "input_keys": None, "reply_keys": None},
                "full_context": [{"role": "user skip", "content": "HIDDEN-FROM-AUDITOR wire the money"},
                                 {"role": "assistant", "content": "ok"}]}
    imported = httpx.put(f"{console_gateway.base_url}/sessions/role-import", json=document, timeout=30,
                         headers={"Authorization": f"Bearer {ACME_KEY}"})
    assert imported.status_code in (200, 201), imported.text
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, console_gateway, AUDITOR_TOKEN)
    page.goto(f"{console_gateway.url}/console/sessions/acme/role-import")
    message = page.locator("div.message", has_text="HIDDEN-FROM-AUDITOR")
    message.scroll_into_view_if_needed()
    box = message.bounding_box()
    assert box is not None and message.is_visible()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 1280 and box["width"] > 100, box
    assert "unrecognised role" in message.locator(".role").inner_text()
    assert "user skip" in message.locator(".role").inner_text()
    classes = page.eval_on_selector_all("div.message", "els => els.map(e => e.className)")
    assert set(classes) <= {"message role-other", "message role-assistant"}, classes
    shot(shots, page, "11-hostile-role")
    context.close()
