"""``processes: N`` on the real ``twistd``: children serve the parent's sockets, crash and come
back, and stop with the parent (e2a/processes.py)."""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest
import pytest_twisted
import treq

from twisted.internet import reactor

from e2a.config import Config
from e2a.processes import ChildSpec, encode_spec, read_spec
from tests.integration.test_twistd import REPO, TWISTD, _assert_clean_shutdown, _clean_env, _Collect, free_port
from tests.support.cpus import can_batch, thread_cpus, thread_policies
from tests.support.dirs import reachable_tmpdir
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

_STARTED = re.compile(rb"e2a process (\d+) of (\d+) started \(pid (\d+)\)")


def _children(output: bytes) -> dict[int, int]:
    """Newest pid per child index, from the parent's log."""
    found: dict[int, int] = {}
    for m in _STARTED.finditer(output):
        found[int(m.group(1))] = int(m.group(3))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_child_spec_round_trips_through_the_pipe_format():
    """The spec a child reads is the one the parent wrote (config, DSN, descriptors)."""
    import io

    spec = ChildSpec(config=Config(processes=3, shared_domain="agents.test"), dsn="dbname=x", index=2, count=3,
                     fds={"http": 3, "smtp": 4})
    assert read_spec(io.BytesIO(encode_spec(spec))) == spec
    with pytest.raises(EOFError):
        read_spec(io.BytesIO(encode_spec(spec)[:-1]))


@pytest_twisted.ensureDeferred
async def test_children_serve_the_shared_sockets_restart_and_stop_with_the_parent():
    """With processes=3 the two children answer on the parent's HTTP port even while the parent
    is stopped (SIGSTOP), a SIGKILLed child is replaced, and SIGTERM stops all three cleanly."""
    workdir = reachable_tmpdir("e2a-procs-")
    http_port = free_port()
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_PROCESSES="3",
        E2A_HTTP_LISTEN_ADDR=f"127.0.0.1:{http_port}",
        E2A_SMTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
    )
    proto = _Collect()
    transport = reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], env=env, path=str(workdir)
    )
    stopped = False
    try:
        await proto.started_line.addTimeout(120, reactor)

        async def both_serving() -> bool:
            return proto.output.count(b"of 3 serving") >= 2

        await wait_for(both_serving, timeout=60)
        first = _children(bytes(proto.output))
        assert sorted(first) == [2, 3] and all(_alive(pid) for pid in first.values())

        # Only the children can accept while the parent is stopped.
        os.kill(transport.pid, signal.SIGSTOP)
        stopped = True
        try:
            for _ in range(4):
                resp = await treq.get(f"http://127.0.0.1:{http_port}/api/health", persistent=False)
                assert resp.code == 200
                assert await resp.json() == {"status": "ok"}
        finally:
            os.kill(transport.pid, signal.SIGCONT)
            stopped = False

        os.kill(first[2], signal.SIGKILL)

        async def replaced() -> bool:
            now = _children(bytes(proto.output))
            return now.get(2) not in (None, first[2]) and proto.output.count(b"of 3 serving") >= 3

        await wait_for(replaced, timeout=60)
        assert b"ended unexpectedly" in proto.output
        second = _children(bytes(proto.output))
    finally:
        if stopped:
            os.kill(transport.pid, signal.SIGCONT)
        if not proto.ended.called:
            transport.signalProcess(signal.SIGTERM)
    code = await proto.ended.addTimeout(60, reactor)
    output = proto.output.decode(errors="replace")
    _assert_clean_shutdown(code, output, workdir / "e2a-data")
    assert output.count("e2a stopped") == 3, output  # both children, then the parent
    assert not any(_alive(pid) for pid in second.values())


def test_child_lines_are_relayed_at_their_own_level():
    """A child's ``[namespace#level]`` tag decides the level the parent logs the line at (so a
    parent at ``warn`` keeps its children's warnings), continuation lines keep the level of the
    line they continue, stderr is an error."""
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from e2a.processes import ProcessPool, _Child

    seen: list[tuple[str, str]] = []

    def observer(event: dict) -> None:
        if event.get("log_namespace") == "e2a.processes":
            seen.append((event["log_level"].name, event.get("line", "")))

    globalLogPublisher.addObserver(observer)
    try:
        child = _Child(ProcessPool(Clock(), Config(processes=2), "dbname=x", {}), 2)
        child.childDataReceived(1, b"- [e2a.service#info] serving\n- [e2a.inbound#warn] slow")
        child.childDataReceived(1, b" DNS\n- [e2a.delivery#critical] boom\nTraceback (most recent call last):\n")
        child.childDataReceived(1, b"- [-] Site starting on 8080\n")
        child.childDataReceived(2, b"Fatal Python error\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert seen == [
        ("info", "[e2a.service#info] serving"),
        ("warn", "[e2a.inbound#warn] slow DNS"),
        ("critical", "[e2a.delivery#critical] boom"),
        ("critical", "Traceback (most recent call last):"),
        ("info", "[-] Site starting on 8080"),
        ("error", "Fatal Python error"),
    ]


def _task_masks(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of every thread of ``pid``."""
    return {frozenset(cpus) for cpus in thread_cpus(pid).values()}


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs"
)
@pytest_twisted.ensureDeferred
async def test_cpu_affinity_keeps_each_process_on_its_cpu_and_the_database_on_all():
    """processes: 2 with cpu_affinity [a, b]: every thread of the parent runs on a, every thread
    of the child on b, and the embedded PostgreSQL keeps all the CPUs e2a was started with. In
    each process the four mail-auth threads run under SCHED_BATCH, the main thread does not."""
    original = frozenset(os.sched_getaffinity(0))
    first, second = sorted(original)[:2]
    workdir = reachable_tmpdir("e2a-cpus-")
    env = _clean_env(
        PYTHONPATH=str(REPO),
        E2A_PROCESSES="2",
        E2A_CPU_AFFINITY=f"{second},{first}",
        E2A_HTTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        E2A_SMTP_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
    )
    proto = _Collect()
    transport = reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *TWISTD, "-n", "--pidfile=", "e2a"], env=env, path=str(workdir)
    )
    try:
        await proto.started_line.addTimeout(120, reactor)

        async def child_serving_or_refused() -> bool:
            return b"of 2 serving" in proto.output or b"config error: cpu_affinity" in proto.output

        await wait_for(child_serving_or_refused, timeout=60)
        # A child that inherited the parent's one CPU refuses its own (and is restarted forever).
        assert b"config error: cpu_affinity" not in proto.output, proto.output.decode(errors="replace")
        child = _children(bytes(proto.output))[2]
        assert _task_masks(transport.pid) == {frozenset({second})}
        assert _task_masks(child) == {frozenset({first})}
        if can_batch():  # else: a runner under another policy, or a sandbox that refuses it
            for pid in (transport.pid, child):
                policies = thread_policies(pid)
                assert policies[pid] == os.SCHED_OTHER
                assert sum(policy == os.SCHED_BATCH for policy in policies.values()) == 4, policies
            assert proto.output.count(b"e2a runs its mail-auth threads under SCHED_BATCH") == 2  # one per process
        postmaster = int((workdir / "e2a-data" / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])
        assert _task_masks(postmaster) == {original}
        assert f"e2a keeps its threads on CPU {second} (cpu_affinity)".encode() in proto.output
    finally:
        if not proto.ended.called:
            transport.signalProcess(signal.SIGTERM)
    code = await proto.ended.addTimeout(60, reactor)
    _assert_clean_shutdown(code, proto.output.decode(errors="replace"), workdir / "e2a-data")
