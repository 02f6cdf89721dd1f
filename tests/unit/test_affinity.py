"""``cpu_affinity`` (e2a.affinity): which CPU each process takes, what is refused at start, and
that pinning reaches every thread while external programs keep the process's original CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from e2a import affinity
from e2a.config import Config, load_config, validate
from e2a.errors import ConfigError
from tests.support.cpus import thread_cpus

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
