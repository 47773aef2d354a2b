"""LocalEngine: separate processes, never over its limits, in parallel where they fit; a task larger than the
engine is held (the reference's semantics)."""
import logging
import os
import subprocess
import sys
import time

import pytest

from sis_util import wait_for
from sisyphus.engine import STATE_ENGINE_FAILED, STATE_QUEUE, STATE_RUNNING, STATE_UNKNOWN, EngineSelector
from sisyphus.localengine import LocalEngine

# A task that records [start, end) in <folder>/<name>.<id>.span, holding its slot for `seconds`.
SPAN_TASK = ("import sys, time; start = time.time(); time.sleep({seconds}); "
             "open('{folder}/{name}.' + sys.argv[1] + '.span', 'w').write(f'{{start}} {{time.time()}}')")


def submit_span(engine, folder, name, task_ids, rqmt, seconds=0.6):
    code = SPAN_TASK.format(seconds=seconds, folder=folder, name=name)
    engine.submit_call([sys.executable, "-c", code], os.path.join(folder, f"log.{name}"), rqmt, name, "run", task_ids)


def spans(folder):
    result = {}
    for entry in os.listdir(folder):
        if entry.endswith(".span"):
            start, end = map(float, open(os.path.join(folder, entry)).read().split())
            result[entry[:-5]] = (start, end)
    return result


def max_overlap(intervals, weights):
    """Brute force: the largest total weight of intervals that contain a common instant (some interval's start)."""
    return max(sum(weights[other] for other, (s, e) in intervals.items() if s <= start < e)
               for start, _ in intervals.values())


@pytest.fixture
def engine():
    engines = []

    def make(**limits):
        e = LocalEngine(**limits)
        e.start_engine()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop_engine()


def wait_ended(engine, name, task_ids, timeout=60):
    wait_for(lambda: all(engine.task_state(name, i) not in (STATE_QUEUE, STATE_RUNNING) for i in task_ids),
             timeout, message=f"{name} {task_ids} to end")


def test_runs_tasks_as_processes_with_logs_and_states(engine, tmp_path):
    local = engine(cpu=1, mem=1)
    call = [sys.executable, "-c", "import os, sys; print('task', sys.argv[1], 'pid', os.getpid()); sys.exit(int(sys.argv[1]) - 1)"]
    local.submit_call(call, str(tmp_path / "log.run"), {"cpu": 1, "mem": 1}, "job.run", "run", [1, 2])
    assert local.task_state("job.run", 2) == STATE_QUEUE  # cpu=1: the second waits for the first
    wait_ended(local, "job.run", [1, 2])
    assert local.task_state("job.run", 1) == STATE_UNKNOWN  # ended with status 0
    assert local.task_state("job.run", 2) == STATE_ENGINE_FAILED  # ended with status 1
    assert local.task_state("job.other", 1) == STATE_UNKNOWN
    first, second = (open(tmp_path / f"log.run.{i}").read().split() for i in (1, 2))
    assert first[:2] == ["task", "1"] and second[:2] == ["task", "2"]
    assert first[3] != second[3] and int(first[3]) != os.getpid()  # separate processes


def test_never_over_cpu_and_memory_limits_but_parallel_where_they_fit(engine, tmp_path):
    local = engine(cpu=2, mem=4)
    submit_span(local, tmp_path, "small", [1, 2, 3, 4], {"cpu": 1, "mem": 1}, seconds=1.0)
    submit_span(local, tmp_path, "wide", [1, 2], {"cpu": 2, "mem": 1})
    submit_span(local, tmp_path, "big", [1, 2], {"cpu": 1, "mem": 3})
    wait_ended(local, "small", [1, 2, 3, 4])
    wait_ended(local, "wide", [1, 2])
    wait_ended(local, "big", [1, 2])
    intervals = spans(tmp_path)
    assert len(intervals) == 8
    cpu = {key: 2 if key.startswith("wide") else 1 for key in intervals}
    mem = {key: 3 if key.startswith("big") else 1 for key in intervals}
    assert max_overlap(intervals, cpu) <= 2
    assert max_overlap(intervals, mem) <= 4
    # Tasks that fit side by side did run side by side.
    small = {k: v for k, v in intervals.items() if k.startswith("small")}
    assert max_overlap(small, dict.fromkeys(small, 1)) == 2


def test_a_task_larger_than_the_engine_is_held_and_the_others_run(engine, tmp_path, caplog):
    local = engine(cpu=2, mem=4)
    with caplog.at_level(logging.WARNING):
        submit_span(local, tmp_path, "huge", [1], {"cpu": 1, "mem": 12})
    assert "Requested resources are higher than maximal available resources" in caplog.text
    submit_span(local, tmp_path, "small", [1], {"cpu": 1, "mem": 1})
    wait_ended(local, "small", [1])
    time.sleep(0.3)
    assert local.task_state("huge", 1) == STATE_QUEUE and "huge.1" not in spans(tmp_path)
    assert local.held_reason("huge", 1) == "asks mem=12 (at most 4), more than the local engine has"
    assert local.held_reason("small", 1) is None
    selector = EngineSelector(engines={"short": engine(cpu=1), "long": local}, default_engine="long")
    assert selector.held_reason("huge", 1) == local.held_reason("huge", 1)


def test_limits_as_the_reference_spells_them(engine, tmp_path):
    local = engine(cpus=2, gpus=1, available_gpus="3", disk=10)
    assert local.limits == {"cpu": 2, "gpu": 1, "disk": 10}  # mem is not limited unless given
    submit_span(local, tmp_path, "memory", [1], {"cpu": 1, "mem": 500}, seconds=0.1)
    submit_span(local, tmp_path, "disk", [1], {"cpu": 1, "disk": 11}, seconds=0.1)
    wait_ended(local, "memory", [1])
    assert "memory.1" in spans(tmp_path)
    assert local.held_reason("disk", 1) == "asks disk=11 (at most 10), more than the local engine has"
    code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    local.submit_call([sys.executable, "-c", code], str(tmp_path / "log.gpu"), {"gpu": 1}, "gpu", "run", [1])
    wait_ended(local, "gpu", [1])
    assert open(tmp_path / "log.gpu.1").read().strip() == "3"


def test_adopted_task_counts_against_the_limits(engine, tmp_path):
    local = engine(cpu=1, mem=2)
    started = time.time()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        local.adopt_running_task("old.run", 1, {"cpu": 1, "mem": 1}, orphan.pid)
        assert local.task_state("old.run", 1) == STATE_RUNNING
        submit_span(local, tmp_path, "new", [1], {"cpu": 1, "mem": 1}, seconds=0.1)
        time.sleep(0.5)
        assert local.task_state("new", 1) == STATE_QUEUE
        orphan.wait()
        wait_ended(local, "new", [1])
        assert spans(tmp_path)["new.1"][0] >= started + 1.4  # started only once the adopted task ended
        assert local.task_state("old.run", 1) == STATE_UNKNOWN
    finally:
        orphan.kill()
        orphan.wait()


def test_gpus_are_handed_out_exclusively(engine, tmp_path):
    local = engine(cpu=4, gpu=2, mem=4)
    code = "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(0.5)"
    local.submit_call([sys.executable, "-c", code], str(tmp_path / "log.gpu"), {"cpu": 1, "gpu": 1}, "gpu", "run",
                      [1, 2, 3])
    local.submit_call([sys.executable, "-c", code], str(tmp_path / "log.cpu"), {"cpu": 1}, "cpu", "run", [1])
    wait_ended(local, "gpu", [1, 2, 3])
    wait_ended(local, "cpu", [1])
    seen = [open(tmp_path / f"log.gpu.{i}").read().strip() for i in (1, 2, 3)]
    assert sorted(seen[:2]) == ["0", "1"] and seen[2] in ("0", "1")
    assert open(tmp_path / "log.cpu.1").read().strip() == ""


def test_wait_for_change_returns_when_a_task_ends(engine, tmp_path):
    local = engine(cpu=1, mem=1)
    local.submit_call([sys.executable, "-c", "pass"], str(tmp_path / "log.quick"), {}, "quick", "run", [1])
    start = time.monotonic()
    while local.task_state("quick", 1) != STATE_UNKNOWN:
        local.wait_for_change(30)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("limits", [dict(cpu=0), dict(cpu=1, mem=0), dict(cpu=1, gpu=-1),
                                    dict(cpu=1, gpu=2, available_gpus="0")])
def test_bad_limits_are_refused(limits):
    with pytest.raises(ValueError, match="LocalEngine"):
        LocalEngine(**limits)


def test_max_overlap_helper():
    intervals = {"a": (0, 2), "b": (1, 3), "c": (2.5, 4)}
    assert max_overlap(intervals, dict.fromkeys(intervals, 1)) == 2
    assert max_overlap({"a": (0, 1), "b": (1, 2)}, {"a": 1, "b": 1}) == 1
