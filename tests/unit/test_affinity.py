"""``cpu_affinity`` (e2a.affinity): which CPU each process takes, what is refused at start, and
that pinning reaches every thread while external programs keep the process's original CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from e2a import affinity
from e2a.config import Config, load_config, validate
from e2a.errors import ConfigError
from tests.support.cpus import can_batch, thread_cpus

ALLOWED = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cpus = pytest.mark.skipif(
    not affinity.supported() or len(ALLOWED) < 2, reason="needs Linux and at least two usable CPUs"
)


@pytest.mark.parametrize(
    ("cpus", "index", "expected"),
    [
        ((), 1, None),
        ((), 3, None),
        ((5,), 1, 5),
        ((5,), 4, 5),
        ((2, 3), 1, 2),
        ((2, 3), 2, 3),
        ((2, 3), 3, 2),
        ((0, 1, 2, 3), 4, 3),
        ((0, 1, 2, 3), 5, 0),
    ],
)
def test_processes_take_the_listed_cpus_in_turn(cpus, index, expected):
    assert affinity.cpu_for_process(cpus, index) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ((0, 1), None),
        ((), None),
        ((1023,), None),
        ((1024,), "cpu_affinity: CPU numbers must be between 0 and 1023"),
        ((-1,), "cpu_affinity: CPU numbers must be between 0 and 1023"),
        ((1, 1), "cpu_affinity: a CPU is listed twice"),
    ],
)
def test_cpu_numbers_are_validated(value, problem):
    problems = [p for p in validate(Config(cpu_affinity=value)) if p.startswith("cpu_affinity")]
    assert problems == ([problem] if problem else [])


def test_cpu_affinity_is_read_from_yaml_and_environment(tmp_path):
    path = tmp_path / "e2a.yaml"
    path.write_text("cpu_affinity: [1, 0]\n")
    assert load_config(str(path), environ={}, cwd=tmp_path).cpu_affinity == (1, 0)
    assert load_config(environ={"E2A_CPU_AFFINITY": "2, 3"}, cwd=tmp_path).cpu_affinity == (2, 3)
    with pytest.raises(ConfigError) as e:
        load_config(environ={"E2A_CPU_AFFINITY": "one"}, cwd=tmp_path)
    assert "E2A_CPU_AFFINITY" in str(e.value)


def test_no_cpu_needs_no_check():
    affinity.check_cpu(None)


@pytest.mark.skipif(not affinity.supported(), reason="Linux only")
def test_a_cpu_the_process_may_not_use_is_refused_with_its_key():
    missing = next(c for c in range(1024) if c not in ALLOWED)
    with pytest.raises(ConfigError) as e:
        affinity.check_cpu(missing)
    text = str(e.value)
    assert f"cpu_affinity: CPU {missing} is not available to this process" in text
    assert ",".join(str(c) for c in ALLOWED) in text
    affinity.check_cpu(ALLOWED[0])


def _masks() -> dict[int, set[int]]:
    return thread_cpus(os.getpid())


def _child_mask() -> set[int]:
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    ).stdout
    return set(eval(out))  # noqa: S307 - our own child's list literal


@needs_two_cpus
def test_pinning_reaches_every_thread_and_external_programs_keep_the_original_cpus():
    cpu = ALLOWED[-1]
    original = set(ALLOWED)
    started = threading.Event()
    release = threading.Event()
    seen: dict[str, set[int]] = {}

    def early() -> None:  # running before the pin: the pin must reach it too
        started.set()
        release.wait(10)
        seen["early"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=early)
    thread.start()
    started.wait(10)
    try:
        affinity.pin_process(cpu)
        assert all(m == {cpu} for m in _masks().values())
        release.set()
        thread.join(10)
        assert seen["early"] == {cpu}

        late: dict[str, set[int]] = {}
        t2 = threading.Thread(target=lambda: late.setdefault("mask", os.sched_getaffinity(0)))
        t2.start()
        t2.join(10)
        assert late["mask"] == {cpu}  # new threads inherit the pin

        with affinity.unpinned():
            assert os.sched_getaffinity(0) == original
            assert _child_mask() == original  # e.g. the embedded PostgreSQL, another process
        assert os.sched_getaffinity(0) == {cpu}
        assert _child_mask() == {cpu}  # what unpinned() is for
        affinity.check_cpu(ALLOWED[0])  # still checked against the original CPUs
    finally:
        affinity.unpin_process()
        release.set()
        thread.join(10)
    assert all(m == original for m in _masks().values())


def test_unpinning_a_process_never_pinned_changes_nothing():
    before = _masks() if affinity.supported() else {}
    affinity.unpin_process()
    with affinity.unpinned():
        pass
    after = _masks() if affinity.supported() else {}
    assert all(after.get(tid, mask) == mask for tid, mask in before.items())


@pytest.mark.skipif(not affinity.supported(), reason="Linux only")
def test_a_cpu_that_cannot_be_used_at_pin_time_leaves_the_process_as_it_was():
    before = _masks()
    missing = next(c for c in range(1024) if c not in ALLOWED)
    with pytest.raises(ConfigError, match=f"cpu_affinity: cannot keep the process on CPU {missing}"):
        affinity.pin_process(missing)
    assert all(_masks().get(tid, mask) == mask for tid, mask in before.items())
    with affinity.unpinned():  # not pinned: nothing to give back
        assert os.sched_getaffinity(0) == before[threading.get_native_id()]


# ---------------------------------------------------------------- colocate_threads


class FakeKernel:
    """The two calls a ThreadFollower makes: which CPU the caller is on, and moving a thread."""

    def __init__(self, cpu: int, refuse: dict[int, OSError] | None = None) -> None:
        self.cpu = cpu
        self.refuse = refuse or {}
        self.moves: list[tuple[int, frozenset[int]]] = []

    def getcpu(self) -> int:
        return self.cpu

    def setaffinity(self, tid: int, cpus: Any) -> None:
        if tid in self.refuse:
            raise self.refuse[tid]
        self.moves.append((tid, frozenset(cpus)))

    def follower(self) -> affinity.ThreadFollower:
        return affinity.ThreadFollower(self.getcpu, self.setaffinity, lambda tid: {0, 1, 2, 3})


@pytest.mark.parametrize(
    ("cpus", "moves"),
    [
        # The caller's CPU at each follow() → the CPU every thread is moved to (None: no move).
        ([1], [1]),
        ([1, 1, 1], [1, None, None]),  # already there: no system call
        ([1, 0, 0, 1], [1, 0, None, 1]),  # the caller moved: the threads follow, each time
        ([-1, 2, -1, 2], [None, 2, None, None]),  # CPU unknown: left where they are
    ],
)
def test_the_threads_follow_the_callers_cpu_and_only_when_it_changed(cpus, moves):
    kernel = FakeKernel(0)
    follower = kernel.follower()
    follower.set_threads([11, 12])
    for cpu, expected in zip(cpus, moves, strict=True):
        kernel.cpu = cpu
        kernel.moves.clear()
        follower.follow()
        assert kernel.moves == ([] if expected is None else [(11, frozenset({expected})), (12, frozenset({expected}))])


def test_new_threads_are_moved_at_the_next_follow_even_on_the_same_cpu():
    kernel = FakeKernel(3)
    follower = kernel.follower()
    follower.set_threads([11])
    follower.follow()
    follower.set_threads([21, 22])  # e.g. the pool restarted: the old ids may be reused
    kernel.moves.clear()
    follower.follow()
    assert kernel.moves == [(21, frozenset({3})), (22, frozenset({3}))]
    assert follower.cpu == 3


def test_a_thread_that_ended_does_not_stop_the_others_from_following():
    kernel = FakeKernel(2, refuse={11: ProcessLookupError(3, "No such process")})
    follower = kernel.follower()
    follower.set_threads([11, 12])
    follower.follow()
    assert kernel.moves == [(12, frozenset({2}))]
    assert follower.active and follower.cpu == 2
    # Forgotten: when the kernel hands its id to another thread or process, that is never moved.
    del kernel.refuse[11]
    kernel.cpu = 3
    kernel.moves.clear()
    follower.follow()
    follower.stop()
    assert kernel.moves == [(12, frozenset({3})), (12, frozenset({0, 1, 2, 3}))]


def test_a_refused_move_gives_every_thread_back_its_cpus_and_stops_following():
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        kernel = FakeKernel(1, refuse={12: PermissionError(1, "Operation not permitted")})
        follower = kernel.follower()
        follower.set_threads([11, 12, 13])
        follower.follow()
    finally:
        globalLogPublisher.removeObserver(events.append)
    # 11 had moved before 12 was refused; then every thread gets the caller's original CPUs back
    # (12 refuses that too, which is left at that).
    assert kernel.moves == [(11, frozenset({1})), (11, frozenset({0, 1, 2, 3})), (13, frozenset({0, 1, 2, 3}))]
    assert not follower.active and follower.cpu == -1
    kernel.moves.clear()
    kernel.cpu = 0
    follower.follow()
    assert kernel.moves == []
    warnings = [e for e in events if "colocate_threads" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["error"] == "Operation not permitted"


def test_no_cpu_reader_where_threads_cannot_be_placed(monkeypatch):
    monkeypatch.setattr(affinity, "supported", lambda: False)
    assert affinity.current_cpu_reader() is None


def in_worker(pool: Any, fn: Any) -> Any:
    """What ``fn()`` returns when called in a worker of ``pool``; taken from inside the call, since
    the tests' pools give their results to a recording reactor that never runs them."""
    seen: list[Any] = []
    done = threading.Event()

    def call() -> None:
        seen.append(fn())
        done.set()

    pool.run(call)
    assert done.wait(30)
    return seen[0]


class RecordingFollower:
    """What a WorkerPool tells its follower, in order."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def set_threads(self, tids: Any) -> None:
        self.calls.append(("threads", tuple(tids)))

    def follow(self) -> None:
        self.calls.append("follow")


def test_a_pool_gives_its_follower_its_threads_at_start_and_none_after_stop():
    """Each start names the threads that run now (a restarted pool has new ones, whose ids the
    kernel may have given to others before); each hand-over follows first."""
    from e2a.workers import WorkerPool
    from tests.unit.test_workers import RecordingReactor

    follower = RecordingFollower()
    reactor = RecordingReactor()
    pool = WorkerPool(reactor, 2, "follower-test", follower)  # type: ignore[arg-type]
    for _ in range(2):  # start, hand over, stop; twice
        pool.start()
        ids = {t.native_id for t in threading.enumerate() if t.name.startswith("follower-test-")}
        done = threading.Event()
        pool.run(done.set)
        assert done.wait(30)
        pool.stop()
        reactor.run_pending()
        threads, follow, cleared = follower.calls
        assert threads[0] == "threads" and set(threads[1]) == ids and len(ids) == 2
        assert follow == "follow" and cleared == ("threads", ())
        follower.calls.clear()


def test_colocate_threads_is_on_by_default_and_read_from_yaml_and_environment(tmp_path):
    assert Config().colocate_threads is True
    assert load_config(environ={}, cwd=tmp_path).colocate_threads is True
    path = tmp_path / "e2a.yaml"
    path.write_text("colocate_threads: false\n")
    assert load_config(str(path), environ={}, cwd=tmp_path).colocate_threads is False
    assert load_config(str(path), environ={"E2A_COLOCATE_THREADS": "yes"}, cwd=tmp_path).colocate_threads is True
    with pytest.raises(ConfigError, match="E2A_COLOCATE_THREADS"):
        load_config(environ={"E2A_COLOCATE_THREADS": "sometimes"}, cwd=tmp_path)


@needs_two_cpus
def test_the_pools_threads_run_on_the_cpu_of_the_thread_that_hands_them_calls():
    """Real threads, real kernel: the calling thread is put on one CPU, then on another; each
    call's worker runs there (it reports its own CPUs from inside the call)."""
    from e2a.workers import WorkerPool
    from tests.unit.test_workers import RecordingReactor

    getcpu = affinity.current_cpu_reader()
    assert getcpu is not None
    follower = affinity.ThreadFollower(getcpu)
    reactor = RecordingReactor()
    pool = WorkerPool(reactor, 2, "follow-test", follower)
    original = os.sched_getaffinity(0)
    pool.start()
    try:
        for cpu in (ALLOWED[0], ALLOWED[-1], ALLOWED[0]):
            os.sched_setaffinity(0, {cpu})  # the "reactor" thread moves
            assert getcpu() == cpu
            assert in_worker(pool, lambda: os.sched_getaffinity(0)) == {cpu}
            assert follower.cpu == cpu
        masks = thread_cpus(os.getpid())
        workers = [t.native_id for t in threading.enumerate() if t.name.startswith("follow-test-")]
        assert len(workers) == 2 and all(masks[tid] == {ALLOWED[0]} for tid in workers)
    finally:
        os.sched_setaffinity(0, original)
        pool.stop()
    reactor.run_pending()


# ---------------------------------------------------------------- SCHED_BATCH


class FakeScheduler:
    """``sched_setscheduler`` for batch_threads: records each (thread, policy), refuses as told."""

    def __init__(self, refuse: dict[int, OSError] | None = None) -> None:
        self.refuse = refuse or {}
        self.calls: list[tuple[int, int]] = []

    def __call__(self, tid: int, policy: int, param: Any) -> None:
        assert param.sched_priority == 0  # the only priority SCHED_BATCH and SCHED_OTHER take
        if tid in self.refuse and policy == os.SCHED_BATCH:
            raise self.refuse[tid]
        self.calls.append((tid, policy))


needs_batch = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")


@needs_batch
@pytest.mark.parametrize(
    ("refuse", "ok", "calls"),
    [
        # every thread changed
        ({}, True, [(11, "batch"), (12, "batch"), (13, "batch")]),
        # an ended thread is skipped, the others still changed
        ({12: ProcessLookupError(3, "No such process")}, True, [(11, "batch"), (13, "batch")]),
        # refused: the threads already changed go back to the default policy, the rest untouched
        ({12: PermissionError(1, "Operation not permitted")}, False, [(11, "batch"), (11, "other")]),
        ({11: PermissionError(1, "Operation not permitted")}, False, []),
    ],
)
def test_batch_threads_changes_each_thread_or_none(refuse, ok, calls):
    from twisted.logger import globalLogPublisher

    names = {os.SCHED_BATCH: "batch", os.SCHED_OTHER: "other"}
    kernel = FakeScheduler(refuse)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert affinity.batch_threads([11, 12, 13], kernel, lambda tid: os.SCHED_OTHER) is ok
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [(tid, names[policy]) for tid, policy in kernel.calls] == calls
    warnings = [e for e in events if "SCHED_BATCH" in e.get("log_format", "")]
    assert len(warnings) == (0 if ok else 1)
    if not ok:
        assert warnings[0]["error"] == "Operation not permitted"


@needs_batch
@pytest.mark.parametrize("policy", ["SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR"])
def test_batch_threads_leaves_a_policy_the_operator_chose(policy):
    """A process started under another policy than the default (its threads inherit it) keeps it."""
    kernel = FakeScheduler()
    assert affinity.batch_threads([11, 12], kernel, lambda tid: getattr(os, policy)) is False
    assert kernel.calls == []


@needs_batch
def test_batch_threads_warns_once_when_it_may_not_even_read_the_policy():
    from twisted.logger import globalLogPublisher

    def refused(tid: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    kernel = FakeScheduler()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert affinity.batch_threads([11], kernel, refused) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert kernel.calls == []
    assert len([e for e in events if "SCHED_BATCH" in e.get("log_format", "")]) == 1


@pytest.mark.skipif(not hasattr(os, "SCHED_RESET_ON_FORK"), reason="Linux only")
def test_batch_threads_reads_the_reset_on_fork_flag_as_no_policy_of_its_own():
    """systemd's CPUSchedulingResetOnFork= adds a flag to the default policy; still the default."""
    kernel = FakeScheduler()
    assert affinity.batch_threads([11], kernel, lambda tid: os.SCHED_OTHER | os.SCHED_RESET_ON_FORK) is True
    assert kernel.calls == [(11, os.SCHED_BATCH)]


def test_batch_threads_does_nothing_where_the_policy_does_not_exist(monkeypatch):
    monkeypatch.delattr(os, "SCHED_BATCH", raising=False)
    kernel = FakeScheduler()
    assert affinity.batch_threads([11], kernel, lambda tid: 0) is False
    assert kernel.calls == []


@pytest.mark.skipif(not can_batch(), reason="SCHED_BATCH not available to this process's threads here")
def test_a_batch_pools_threads_run_under_sched_batch_after_each_start_and_the_caller_keeps_its_policy():
    """Real threads, real kernel: each worker reports its own policy from inside a call, after
    the first start and after a restart (new threads); a pool without ``batch`` leaves them be."""
    from e2a.workers import WorkerPool
    from tests.unit.test_workers import RecordingReactor

    def policies(pool: WorkerPool) -> list[int]:
        return [in_worker(pool, lambda: os.sched_getscheduler(0)) for _ in range(4)]

    pool = WorkerPool(RecordingReactor(), 2, "batch-test", batch=True)
    assert pool.thread_ids == () and not pool.batched
    for _ in range(2):
        pool.start()
        try:
            ids = pool.thread_ids
            names = {t.native_id for t in threading.enumerate() if t.name.startswith("batch-test-")}
            assert len(ids) == 2 and set(ids) == names
            assert pool.batched
            assert policies(pool) == [os.SCHED_BATCH] * 4
            assert os.sched_getscheduler(0) == os.SCHED_OTHER
        finally:
            pool.stop()
        assert pool.thread_ids == () and not pool.batched
    plain = WorkerPool(RecordingReactor(), 2, "plain-test")
    plain.start()
    try:
        assert not plain.batched and policies(plain) == [os.SCHED_OTHER] * 4
    finally:
        plain.stop()
