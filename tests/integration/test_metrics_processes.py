"""``processes: N`` metrics: counters written by separate processes into one directory are all
reported by any process's exposition, and a dead process's WebSocket count is dropped."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

_CHILD = textwrap.dedent(
    """
    import sys
    from e2a import metrics
    metrics.enable_multiprocess(sys.argv[1], reset=False)
    m = metrics.E2AMetrics(multiprocess_dir=sys.argv[1])
    for _ in range(int(sys.argv[2])):
        m.smtp_connection(True)
    m.watch_websockets(lambda: 7)
    m.sample_websockets()
    """
)

_SCRAPER = textwrap.dedent(
    """
    import sys
    from twisted.internet import defer, task
    from e2a import metrics
    metrics.enable_multiprocess(sys.argv[1], reset=False)
    m = metrics.E2AMetrics(multiprocess_dir=sys.argv[1])
    m.smtp_connection(False)
    m.watch_websockets(lambda: 2)
    d = defer.ensureDeferred(m.exposition(None))
    sys.stdout.write(d.result.decode())
    """
)


def _run(script: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True).stdout


def test_any_process_reports_every_process_counters(tmp_path):
    """Two writers (3 and 4 connections) and the scraping process (1 refused): the scrape shows
    all three; the writers have exited, so only the scraper's WebSocket count remains."""
    from e2a import metrics

    path = metrics.multiprocess_dir(tmp_path)
    import os

    os.makedirs(path)
    _run(_CHILD, path, "3")
    _run(_CHILD, path, "4")
    text = _run(_SCRAPER, path)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
    }
    assert values[("e2a_smtp_connections_total", (("result", "accepted"),))] == 7
    assert values[("e2a_smtp_connections_total", (("result", "refused"),))] == 1
    assert values[("e2a_websocket_connections", ())] == 2
    assert values[("e2a_hitl_pending", ())] == 0


def _health_count(text: str) -> float:
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == "e2a_http_requests_total" and s.labels.get("route") == "/api/health"
    )


@pytest_twisted.ensureDeferred
async def test_twistd_processes_scrape_of_parent_reports_child_requests():
    """processes=2 on the real twistd: requests served by the child while the parent is stopped
    (SIGSTOP) are reported by the parent's /metrics while the child is stopped."""
    import os
    import re
    import signal

    import treq

    from twisted.internet import reactor

    from tests.integration.test_twistd import REPO, TWISTD, _clean_env, _Collect, free_port
    from tests.support.dirs import reachable_tmpdir
    from tests.support.waiting import wait_for

    workdir = reachable_tmpdir("e2a-metrics-procs-")
    http_port = free_port()
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_PROCESSES="2",
        E2A_HTTP_LISTEN_ADDR=f"127.0.0.1:{http_port}",
        E2A_SMTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
    )
    proto = _Collect()
    transport = reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], env=env, path=str(workdir)
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        await proto.started_line.addTimeout(120, reactor)

        async def child_serving() -> bool:
            return b"of 2 serving" in proto.output

        await wait_for(child_serving, timeout=60)
        child_pid = int(re.search(rb"e2a process 2 of 2 started \(pid (\d+)\)", proto.output).group(1))
        os.kill(transport.pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                resp = await treq.get(url + "/api/health", persistent=False)
                assert resp.code == 200
                await treq.content(resp)
        finally:
            os.kill(transport.pid, signal.SIGCONT)
        os.kill(child_pid, signal.SIGSTOP)
        try:
            resp = await treq.get(url + "/metrics", persistent=False)
            text = (await treq.content(resp)).decode()
        finally:
            os.kill(child_pid, signal.SIGCONT)
        assert resp.code == 200, text
        assert _health_count(text) >= 5, text
        assert os.path.isdir(workdir / "e2a-data" / "metrics")
    finally:
        if not proto.ended.called:
            transport.signalProcess(signal.SIGTERM)
    await proto.ended.addTimeout(60, reactor)
