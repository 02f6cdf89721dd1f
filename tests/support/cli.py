"""Running the real ``e2a`` console script as a subprocess from a reactor-driven test.

The blocking subprocess calls run in the reactor's thread pool, so the e2a server that the
test started in this process keeps serving while the CLI talks to it. Every wait is on real
I/O with a deadline (a broken test fails, it never sleeps "long enough").
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

E2A = str(Path(sys.executable).parent / "e2a")
DEADLINE = 60.0


def cli_env(home: Path, url: str | None = None, key: str | None = None, agent: str | None = None) -> dict[str, str]:
    """A clean environment: no inherited E2A_* settings, HOME pointing at the test's directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2A_")}
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NO_PROXY", None)
    env["no_proxy"] = "*"
    for name, value in (("E2A_URL", url), ("E2A_API_KEY", key), ("E2A_AGENT_EMAIL", agent)):
        if value is not None:
            env[name] = value
    return env


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def _in_thread(func, *args):
    return deferToThreadPool(reactor, reactor.getThreadPool(), func, *args)


async def run_cli(env: dict[str, str], *args: str, stdin: str | bytes | None = None) -> CliResult:
    """Run ``e2a ARGS`` to completion and return its exit code and output."""

    def thd_run() -> CliResult:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        proc = subprocess.run(
            [E2A, *args], input=data if data is not None else b"", env=env, capture_output=True, timeout=DEADLINE
        )
        return CliResult(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))

    return await _in_thread(thd_run)


class CliProcess:
    """A long-running ``e2a`` (``listen``) whose stdout/stderr lines are read as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [E2A, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.err_lines: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, sink: queue.Queue) -> None:
        for line in iter(stream.readline, b""):
            sink.put(line.decode("utf-8", "replace").rstrip("\n"))
        sink.put(None)

    async def stdout_line(self, timeout: float = DEADLINE) -> str | None:
        return await _in_thread(self.out.get, True, timeout)

    async def stderr_until(self, needle: str, timeout: float = DEADLINE) -> str:
        """Read stderr lines until one contains ``needle`` (returns it)."""

        def thd_wait() -> str:
            while True:
                line = self.err.get(True, timeout)
                if line is None:
                    raise AssertionError(f"stderr closed before {needle!r}: {self.err_lines}")
                self.err_lines.append(line)
                if needle in line:
                    return line

        return await _in_thread(thd_wait)

    async def interrupt(self, timeout: float = DEADLINE) -> int:
        """Ctrl-C (SIGINT) and wait for the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return await _in_thread(self.proc.wait, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
