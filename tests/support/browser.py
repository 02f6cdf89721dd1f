"""Headless Chromium for the browser tests (Selenium, Debian's ``chromium`` and
``chromium-driver``): where the binaries are, the flags that keep it on loopback, and one way to
start a session.

Skipped tests, not failures, when no Chromium is installed (CI installs it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

__all__ = ["BROWSER_FLAGS", "CHROMEDRIVER", "CHROMIUM", "ChromeSession"]


def _find(names: tuple[str, ...], fallback: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return fallback if os.access(fallback, os.X_OK) else None


CHROMIUM = os.environ.get("E2A_TEST_CHROMIUM") or _find(("chromium", "chromium-browser", "google-chrome"),
                                                         "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("E2A_TEST_CHROMEDRIVER") or _find(("chromedriver",), "/usr/bin/chromedriver")

BROWSER_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-default-browser-check", "--window-size=1000,900",
    # No lookup or connection ever leaves loopback, whatever the browser's own pages try.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server",
)

#: Chromium's single-instance socket: ``$TMPDIR/.org.chromium.Chromium.XXXXXX/SingletonSocket``.
_SOCKET_SUFFIX = len(b"/.org.chromium.Chromium.XXXXXX/SingletonSocket")
#: The smallest limit on a Unix socket path among the systems the tests run on (macOS: 104
#: bytes with the terminating NUL; Linux: 108).
_MAX_SOCKET_PATH = 103


class ChromeSession:
    """A blocking Selenium session of headless Chromium with the profile ``profile``; call its
    methods through :func:`twisted.internet.threads.deferToThread`.

    Chromium refuses to start when its single-instance socket's path is too long for a Unix
    socket, which a long ``TMPDIR`` (macOS's, plus the test run's own directory) makes it. The
    browser is then given a temporary directory of its own in the system's shortest one,
    removed by :meth:`quit`.
    """

    def __init__(self, profile: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        assert CHROMIUM is not None
        options.binary_location = CHROMIUM
        for flag in BROWSER_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self._own_tmp: str | None = None
        env: dict[str, str] | None = None
        if len(os.fsencode(tempfile.gettempdir())) + _SOCKET_SUFFIX > _MAX_SOCKET_PATH:
            self._own_tmp = tempfile.mkdtemp(prefix="e2a-chromium-", dir="/tmp")
            env = {**os.environ, "TMPDIR": self._own_tmp}
        try:
            self.driver: Any = webdriver.Chrome(
                options=options, service=Service(executable_path=CHROMEDRIVER, env=env)
            )
        except BaseException:
            self._remove_tmp()
            raise
        self.driver.set_page_load_timeout(30)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._own_tmp is not None:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
            self._own_tmp = None
