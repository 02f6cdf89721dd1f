"""A real browser on the magic link: headless Chromium opens the approve link from the captured
notification mail, the page renders with no console error and no blocked or foreign request,
the button is clicked, ``Approved`` shows, and the message is then ``sent`` and delivered.

Skipped only when no Chromium/chromedriver is installed (CI installs Debian's ``chromium`` and
``chromium-driver``). The e2a service runs in the test's reactor; every blocking WebDriver call
runs in a thread (``deferToThread``) so the reactor keeps serving the browser meanwhile.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, threads

from tests.support.browser import CHROMEDRIVER, CHROMIUM, ChromeSession
from tests.support.hitlstack import OWNER, links_in, start_hitl_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium installed: install Debian's chromium and chromium-driver packages to run the browser test",
)


class Browser(ChromeSession):
    """A blocking Selenium session; call every method through :func:`threads.deferToThread`."""

    def open(self, url: str) -> dict[str, Any]:
        from selenium.webdriver.common.by import By

        self.driver.get(url)
        return {"title": self.driver.title, "h1": self.driver.find_element(By.TAG_NAME, "h1").text,
                "text": self.driver.find_element(By.TAG_NAME, "body").text}

    def click_submit(self) -> str:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        button = self.driver.find_element(By.CSS_SELECTOR, "form button[type=submit]")
        button.click()
        WebDriverWait(self.driver, 30).until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "Approved"))
        return self.driver.find_element(By.TAG_NAME, "h1").text

    def logs(self, kind: str) -> list[dict[str, Any]]:
        return self.driver.get_log(kind)

    def screenshot(self, path: str) -> bool:
        return self.driver.save_screenshot(path)


def _requests(performance: list[dict[str, Any]], base: str) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """(method, URL) of every request made by a page of ``base`` (or for one), and every failed
    or blocked load among them. The browser's own start page (new tab) is not ours to judge."""
    requests: dict[str, tuple[str, str, str]] = {}
    failures: list[dict[str, Any]] = []
    for entry in performance:
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            r = params["request"]
            requests[params["requestId"]] = (r["method"], r["url"], params.get("documentURL", ""))
        elif message["method"] == "Network.loadingFailed":
            failures.append(params)
    ours = {rid: (m, u) for rid, (m, u, doc) in requests.items() if u.startswith(base) or doc.startswith(base)}
    failed = [f for f in failures if f["requestId"] in ours]
    return list(ours.values()), failed


@pytest.fixture
def browser_env(monkeypatch):
    # Selenium Manager must not look for drivers on the network: the paths are given.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")


@pytest.mark.timeout(180)
@pytest_twisted.ensureDeferred
async def test_browser_approves_from_notification_link(e2a_service_factory, tmp_path, browser_env):
    """Headless Chromium: link from the mail → confirmation page without console errors or
    blocked requests → click → ``Approved``; the message is ``sent`` and reaches the relay."""
    stack = await start_hitl_stack(e2a_service_factory)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    browser = None
    try:
        mid = await stack.hold(subject="Browser <check> & approve", body="Hi Bob,\nplease see below.")

        async def notified() -> bool:
            return len(stack.sink.messages) >= 1

        await wait_for(notified)
        [mail] = stack.sink.messages
        assert mail.recipients == [OWNER]
        import email
        import email.policy

        text = email.message_from_bytes(mail.content, policy=email.policy.default).get_payload()[0].get_content()
        url = stack.base + stack.local(links_in(text)["approve"])

        browser = await threads.deferToThread(Browser, profile)
        page = await threads.deferToThread(browser.open, url)
        assert page["h1"] == "Approve outbound email", page
        assert "Browser <check> & approve" in page["text"] and "Hi Bob," in page["text"]
        await threads.deferToThread(browser.screenshot, str(tmp_path / "confirmation.png"))
        console = await threads.deferToThread(browser.logs, "browser")
        assert await stack.status(mid) == "pending_approval"  # the page load changed nothing

        heading = await threads.deferToThread(browser.click_submit)
        assert heading == "Approved"
        shot = tmp_path / "approved.png"
        assert await threads.deferToThread(browser.screenshot, str(shot))
        assert shot.stat().st_size > 1000
        console += await threads.deferToThread(browser.logs, "browser")
        sent, failed = _requests(await threads.deferToThread(browser.logs, "performance"), stack.base)

        assert [e for e in console if e.get("level") in ("SEVERE", "WARNING")] == [], console
        assert failed == [], (failed, sent)
        assert sent, "no request recorded"
        assert all(u.startswith(stack.base + "/api/v1/approve") for _m, u in sent), sent
        assert ("POST", stack.base + "/api/v1/approve") in sent

        assert await stack.status(mid) == "sent"

        async def delivered() -> bool:
            row = await stack.service.db.fetchone("SELECT delivery_status FROM messages WHERE id = %s", (mid,))
            return row["delivery_status"] == "sent" and len(stack.sink.messages) >= 2

        await wait_for(delivered)
        assert stack.sink.messages[1].recipients == ["bob@example.net"]
        assert b"Hi Bob," in stack.sink.messages[1].content
    finally:
        if browser is not None:
            await threads.deferToThread(browser.quit)
        await defer.ensureDeferred(stack.stop())
