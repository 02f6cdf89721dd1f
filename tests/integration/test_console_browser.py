"""The web console in headless Chromium against a whole e2a service (real PostgreSQL, SMTP in,
an SMTP sink as upstream relay, a local webhook receiver).

One walk through the console: sign in with a key; create a cloud agent whose webhook fails;
send it mail over SMTP and see it in the inbox with its verdict badge; open it; see the webhook
failing on the overview, fix the receiver and Redeliver; hold an outbound mail, edit its
subject on the Approvals page, approve, and see it relayed with the new subject; create and
revoke a signing secret; check the layout at 360 px; sign out and be refused. After every page
the browser's console log must hold no error and no CSP violation, and no request may fail.
Screenshots of every page go to a folder the test prints.

Skipped only when Chromium/chromedriver are missing (see test_magiclink_browser.py).
"""

from __future__ import annotations

import email
import email.policy
import os
import tempfile
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from e2a.config import WebhooksConfig
from tests.integration.test_magiclink_browser import (  # noqa: F401 - browser_env is a fixture
    _requests,
    browser_env,
)
from tests.support.browser import CHROMEDRIVER, CHROMIUM, ChromeSession
from tests.support.hitlstack import AGENT, start_hitl_stack
from tests.support.mail import make_message, send_mail
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium installed: install Debian's chromium and chromium-driver packages to run the browser test",
)

BETA = "beta@agents.test"


class Receiver(Resource):
    """A webhook endpoint whose answer the test switches (500 = broken, 200 = fixed)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 500
        self.hits = 0

    def render_POST(self, request: Any) -> bytes:  # noqa: N802 - Twisted API
        self.hits += 1
        request.setResponseCode(self.code)
        return b"ok" if self.code == 200 else b"broken"


class ConsoleBrowser(ChromeSession):
    """A blocking Selenium session; call every method through :func:`threads.deferToThread`."""

    def __init__(self, profile: str, shots: str) -> None:
        super().__init__(profile)
        self.shots = shots
        self.console: list[dict[str, Any]] = []
        self.performance: list[dict[str, Any]] = []

    def _collect(self) -> None:
        self.console += self.driver.get_log("browser")
        self.performance += self.driver.get_log("performance")

    def open(self, url: str) -> str:
        self.driver.get(url)
        self._collect()
        return self.h1()

    def h1(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "h1").text

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def url(self) -> str:
        return self.driver.current_url

    def fill(self, values: dict[str, str]) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        for name, value in values.items():
            element = self.driver.find_element(By.ID, name)
            if element.tag_name == "select":
                Select(element).select_by_value(value)
            else:
                element.clear()
                element.send_keys(value)

    def click(self, xpath: str) -> str:
        """Click and wait for the next page (its h1)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        old = self.driver.find_element(By.TAG_NAME, "html")
        self.driver.find_element(By.XPATH, xpath).click()

        def replaced(driver: Any) -> bool:
            # Chrome reports a node of the unloaded page either as stale or, mid-navigation, as
            # "does not belong to the document": both mean the old page is gone.
            try:
                old.is_enabled()
                return False
            except WebDriverException:
                pass
            try:
                return driver.execute_script("return document.readyState") == "complete"
            except WebDriverException:
                return False

        WebDriverWait(self.driver, 30).until(replaced)
        self._collect()
        return self.h1()

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(os.path.join(self.shots, f"{name}.png"))

    def small_shot(self, name: str, width: int, height: int) -> None:
        """A compact screenshot (the README's pictures come from these)."""
        self.driver.set_window_size(width, height)
        self.driver.save_screenshot(os.path.join(self.shots, f"{name}.png"))
        self.driver.set_window_size(1000, 900)

    def width_fits(self, width: int, url: str) -> tuple[int, int]:
        self.driver.set_window_size(width, 800)
        self.driver.get(url)
        self._collect()
        inner = self.driver.execute_script("return window.innerWidth")
        scroll = self.driver.execute_script("return document.documentElement.scrollWidth")
        return inner, scroll



def _in_thread(fn: Any, *args: Any) -> Any:
    return threads.deferToThread(fn, *args)


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("browser_env")
@pytest_twisted.ensureDeferred
async def test_console_walkthrough_in_headless_chromium(e2a_service_factory, tmp_path, capsys):
    """Sign in, agent, SMTP mail + badge, failing webhook + Redeliver, edit+approve a hold,
    secret create/revoke, 360 px, sign out — no console errors, CSP violations or failed loads."""
    stack = await start_hitl_stack(e2a_service_factory, webhooks=WebhooksConfig(allow_private=True))
    receiver = Receiver()
    hook_port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
    hook = f"http://127.0.0.1:{hook_port.getHost().port}/hook"
    shots = os.environ.get("E2A_CONSOLE_SHOTS") or str(tmp_path / "console-screenshots")
    os.makedirs(shots, exist_ok=True)
    with capsys.disabled():  # shown even when pytest captures output
        print(f"\nconsole screenshots: {shots}")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    db = stack.service.db
    b: ConsoleBrowser | None = None
    try:
        b = await _in_thread(ConsoleBrowser, profile, shots)
        base = stack.base + "/console"

        # -- sign in with the bootstrap (user-scoped) key
        assert await _in_thread(b.open, base + "/") == "Sign in"
        await _in_thread(b.shot, "01-signin")
        await _in_thread(b.fill, {"key": stack.key})
        assert await _in_thread(b.click, "//button[text()='Sign in']") == "Overview"

        # -- create a cloud agent whose webhook receiver is broken
        await _in_thread(b.fill, {"slug": "beta", "name": "Beta bot", "agent_mode": "cloud", "webhook_url": hook})
        assert await _in_thread(b.click, "//button[text()='Create agent']") == BETA
        assert "Agent created." in await _in_thread(b.text)

        # -- mail over SMTP
        message = make_message(from_addr="alice@example.org", to_addr=BETA, subject="Hello from SMTP",
                               body="Hi Beta,\r\nthe report is attached in spirit.\r\n")
        reply = await send_mail(stack.service.smtp_port.getHost().port, "alice@example.org", [BETA], message)
        assert reply.code == 250, reply

        async def attempted() -> bool:
            row = await db.fetchone("SELECT last_error FROM deliveries WHERE agent_id = %s", (BETA,))
            return row is not None and row["last_error"] != ""

        await wait_for(attempted)

        # -- overview: the webhook shows failing
        assert await _in_thread(b.open, base + "/") == "Overview"
        overview = await _in_thread(b.text)
        assert "Beta bot" in overview and "failing" in overview
        await _in_thread(b.shot, "02-overview")
        await _in_thread(b.small_shot, "readme-overview", 1000, 760)

        # -- agent page: inbox row with its badge, delivery failing
        assert await _in_thread(b.open, f"{base}/agents/{BETA}") == BETA
        page = await _in_thread(b.text)
        assert "Hello from SMTP" in page and "not verified" in page and "spf=" in page, page
        await _in_thread(b.shot, "03-agent")

        # -- the message itself
        assert await _in_thread(b.click, "//a[.//bdi[text()='Hello from SMTP']]") == "Hello from SMTP"
        page = await _in_thread(b.text)
        assert "Hi Beta," in page and "alice@example.org" in page and "Download the raw message" in page
        await _in_thread(b.shot, "04-message")

        # -- fix the receiver, Redeliver
        receiver.code = 200
        await _in_thread(b.open, f"{base}/agents/{BETA}")
        assert await _in_thread(b.click, "//button[text()='Redeliver']") == BETA
        assert "Redelivery queued." in await _in_thread(b.text)

        async def delivered() -> bool:
            row = await db.fetchone(
                "SELECT count(*) AS n FROM deliveries WHERE agent_id = %s AND status = 'delivered'", (BETA,))
            return row["n"] >= 1

        await wait_for(delivered)
        await _in_thread(b.open, f"{base}/agents/{BETA}")
        assert "delivered" in await _in_thread(b.text)
        await _in_thread(b.open, base + "/")
        assert "ok" in await _in_thread(b.text)

        # -- hold, edit the subject on the Approvals page, approve
        mid = await stack.hold(subject="Quarterly numbers", body="Hello Bob,\nthe numbers.")
        assert await _in_thread(b.open, base + "/approvals") == "Approvals"
        assert "Quarterly numbers" in await _in_thread(b.text)
        await _in_thread(b.shot, "05-approvals")
        await _in_thread(b.small_shot, "readme-approvals", 1000, 420)
        assert (await _in_thread(b.click, "//a[.//bdi[text()='Quarterly numbers']]")).startswith("Review:")
        await _in_thread(b.shot, "06-approval-detail")
        await _in_thread(b.fill, {"subject": "Quarterly numbers (final)"})
        assert await _in_thread(b.click, "//button[text()='Approve and send']") == "Approvals"
        assert "Approved" in await _in_thread(b.text)
        assert await stack.status(mid) == "sent"

        def relayed() -> list[Any]:
            out = []
            for m in stack.sink.messages:
                if m.recipients == ["bob@example.net"]:
                    out.append(email.message_from_bytes(m.content, policy=email.policy.default))
            return out

        async def arrived() -> bool:
            return bool(relayed())

        await wait_for(arrived)
        assert relayed()[0]["Subject"] == "Quarterly numbers (final)"
        await _in_thread(b.open, f"{base}/agents/{AGENT}")
        page = await _in_thread(b.text)
        assert "Quarterly numbers (final)" in page and "edited" in page and "[e2a] approve" not in page
        await _in_thread(b.shot, "07-agent-sent")

        # -- a signing secret: created (shown once), then revoked
        assert await _in_thread(b.open, base + "/keys") == "Keys & secrets"
        await _in_thread(b.fill, {"secret_name": "browser-secret"})
        assert await _in_thread(b.click, "//button[text()='Create secret']") == "Keys & secrets"
        page = await _in_thread(b.text)
        assert "shown only this once" in page and "browser-secret" in page
        await _in_thread(b.shot, "08-keys-secret-shown")
        before = await db.fetchone("SELECT count(*) AS n FROM signing_secrets WHERE user_id = %s", (stack.user_id,))
        await _in_thread(b.click, "//button[@aria-label='Revoke secret browser-secret']")
        assert "Secret revoked." in await _in_thread(b.text)
        after = await db.fetchone("SELECT count(*) AS n FROM signing_secrets WHERE user_id = %s", (stack.user_id,))
        assert after["n"] == before["n"] - 1

        # -- the remaining pages
        assert await _in_thread(b.open, base + "/domains") == "Domains"
        await _in_thread(b.fill, {"domain": "example.org"})
        assert await _in_thread(b.click, "//button[text()='Add domain']") == "Domains"
        page = await _in_thread(b.text)
        assert "_domainkey.example.org" in page and "v=DKIM1" in page and "v=spf1" in page and "_dmarc" in page
        # the copy buttons are hidden without JS; the same-origin script shows them
        assert await _in_thread(b.driver.execute_script,
                                "return [...document.querySelectorAll('button[data-copy]')].every(b => !b.hidden)")
        await _in_thread(b.shot, "09-domains")
        assert await _in_thread(b.open, base + "/account") == "Account"
        await _in_thread(b.shot, "10-account")

        # -- 360 px: no horizontal page scroll on any main page
        for path in ("/approvals", f"/agents/{BETA}", "/keys", "/domains", "/"):
            inner, scroll = await _in_thread(b.width_fits, 360, base + path)
            assert scroll <= inner, (path, inner, scroll)
        await _in_thread(b.shot, "11-overview-360px")
        await _in_thread(b.driver.set_window_size, 1000, 900)

        # -- sign out, and be refused afterwards
        await _in_thread(b.open, base + "/")
        assert await _in_thread(b.click, "//button[text()='Sign out']") == "Sign in"
        assert await _in_thread(b.open, base + "/approvals") == "Sign in"
        assert (await _in_thread(b.url)).endswith("/console/signin")
        await _in_thread(b.shot, "12-signed-out")

        # -- nothing went wrong in the browser on any page
        problems = [e for e in b.console if e.get("level") in ("SEVERE", "WARNING")]
        assert problems == [], problems
        sent, failed = _requests(b.performance, stack.base)
        assert failed == [], failed
        assert sent and all(u.startswith(stack.base) for _m, u in sent), sent
        assert any(u.endswith("/console/static/console.css") for _m, u in sent)
    finally:
        if b is not None:
            await _in_thread(b.quit)
        await hook_port.stopListening()
        await defer.ensureDeferred(stack.stop())
