"""The local executor with worker processes: the same values, cache and errors as in-process, tasks really side by
side, a dying worker named, uncached values held no longer than in-process, and a real run equal to the bit."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from report_builder.__main__ import main
from report_builder.errors import UserError
from report_builder.pipeline.cache import Cache
from report_builder.pipeline import progress as progress_module
from report_builder.pipeline.progress import Progress, current
from report_builder.pipeline.tasks import Graph, LocalExecutor
from report_builder.pipeline.workers import WorkerExecutor, auto_workers, executor_for
from report_builder.report.rundir import without_timings

# Task functions live at module level: a worker process imports them by name.


def square(x: int) -> int:
    return x * x


def total(a: int, parts: list[int]) -> int:
    return a + sum(parts)


def where(i: int, pause: float) -> tuple[int, float, float]:
    start = time.time()
    time.sleep(pause)
    return os.getpid(), start, time.time()


def fail(kind: str) -> None:
    if kind == "user":
        raise UserError("images.names[0]: no such photo 'x' (a planted bad input)")
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError("a planted bug")


def logged(log: str, text: str, value: int | None = None, pixels: int | None = None) -> int:
    with open(log, "a") as f:
        f.write(f"{text}\n")
    time.sleep(0.05)
    return value if value is not None else len(text)


def counted(steps: int, pause: float) -> int:
    for _ in current().track(range(steps), "planted loop", unit="steps"):
        time.sleep(pause)
    return steps


def _graph() -> tuple[Graph, str, list[str]]:
    g = Graph()
    parts = [g.add("square", square, f"square {i}", {"i": i}, {"x": i}) for i in range(6)]
    return g, g.add("total", total, "total", {}, {"a": 10}, {"parts": parts}), parts


def test_workers_give_the_in_process_values_and_share_the_cache(tmp_path):
    g, key, parts = _graph()
    with WorkerExecutor(2, 1) as ex:
        out = ex.run(g, [key], Cache(tmp_path / "c"), Progress(quiet=True))
    here = LocalExecutor().run(_graph()[0], [key], Cache(tmp_path / "here"), Progress(quiet=True))
    assert out.values == here.values == {key: 10 + sum(i * i for i in range(6))}
    assert out.computed == {key, *parts} and set(out.seconds) == {"square", "total"}
    # what the workers computed is in the cache: an in-process rerun computes nothing
    again = LocalExecutor().run(_graph()[0], [key], Cache(tmp_path / "c"), Progress(quiet=True))
    assert again.values == out.values and again.computed == set()


def test_independent_tasks_run_side_by_side_in_other_processes(tmp_path):
    g = Graph()
    keys = [g.add("where", where, f"where {i}", {"i": i}, {"i": i, "pause": 1.0}, cache=False) for i in range(2)]
    with WorkerExecutor(2, 1) as ex:
        out = ex.run(g, keys, Cache(tmp_path, enabled=False), Progress(quiet=True))
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = (out.values[k] for k in keys)
    assert os.getpid() not in (pid_a, pid_b) and pid_a != pid_b
    assert start_b < end_a and start_a < end_b  # the two sleeps overlapped


@pytest.mark.parametrize("kind, error, text", [
    ("user", UserError, "images.names[0]: no such photo 'x'"),
    ("bug", ValueError, "a planted bug"),
    ("die", UserError, "a worker process died while it ran .*'fail die'"),
])
def test_a_failing_task_fails_the_run_with_its_own_error(tmp_path, kind, error, text):
    g = Graph()
    slow = g.add("where", where, "slow", {"i": 0}, {"i": 0, "pause": 30.0}, cache=False)
    bad = g.add("fail", fail, f"fail {kind}", {"kind": kind}, {"kind": kind})
    started = time.perf_counter()
    with pytest.raises(error, match=text.replace("[0]", r"\[0\]")):
        with WorkerExecutor(2, 1) as ex:
            ex.run(g, [slow, bad], Cache(tmp_path), Progress(quiet=True))
    # the other worker's 30 s task is stopped with the run, not waited for
    assert time.perf_counter() - started < 20
    assert not list(tmp_path.glob("fail/*/*.pt"))


def test_a_long_task_shows_its_own_count_rate_and_eta_in_the_log(tmp_path, monkeypatch):
    """Off a terminal, the log's progress line names each running task with the bars it has open in its worker:
    a stage of a few long tasks (CLIP's images, a LIME run) shows where each task is, not only 0 of 2 tasks."""
    monkeypatch.setattr(progress_module, "LOG_SECONDS", 0.4)
    g = Graph()
    keys = [g.add("counted", counted, f"counted {i}", {"i": i}, {"steps": 10, "pause": 0.3}) for i in range(2)]
    log = io.StringIO()
    with WorkerExecutor(2, 1) as ex:
        out = ex.run(g, keys, Cache(tmp_path), Progress(stream=log, live=False))
    assert [out.values[k] for k in keys] == [10, 10]
    lines = log.getvalue().splitlines()
    both = [line for line in lines if re.search(r"counted 0: planted loop \d+/10 \(\d+%\) [\d.]+ steps/s ETA", line)
            and re.search(r"counted 1: planted loop \d+/10", line)]
    assert both, lines  # the two tasks side by side, each with its own count, rate and ETA
    assert len({re.search(r"counted 0: planted loop (\d+)/10", line).group(1) for line in both}) > 1  # it moves


def test_uncached_values_are_read_before_more_are_made(tmp_path):
    # a probe shard's decoded pixels: with 2 workers at most 2 are held, each read by both readers before more
    log = str(tmp_path / "log")
    g = Graph()
    shards = [g.add("pixels", logged, f"pixels {i}", {"i": i}, {"log": log, "text": f"make {i}", "value": i},
                    cache=False) for i in range(4)]
    totals = [g.add("total", total, f"total {who}", {"who": who}, {"a": 0}, {"parts": [
        g.add("read", logged, f"{who} {i}", {"who": who}, {"log": log, "text": f"{who} reads {i}"}, {"pixels": k})
        for i, k in enumerate(shards)]}) for who in ("a", "b")]
    with WorkerExecutor(2, 1) as ex:
        out = ex.run(g, totals, Cache(tmp_path / "c"), Progress(quiet=True))
    assert [out.values[t] for t in totals] == [4 * len("a reads 0")] * 2
    held, reads, most = set(), {}, 0
    for line in Path(log).read_text().splitlines():  # "make 2", "a reads 2", ...
        i = line.split()[-1]
        if line.startswith("make"):
            held.add(i)
        else:
            reads[i] = reads.get(i, 0) + 1
            if reads[i] == 2:
                held.discard(i)
        most = max(most, len(held))
    assert most <= 2 and len(reads) == 4


def test_auto_is_one_worker_per_thread_within_memory_on_a_cpu_and_one_process_on_a_gpu():
    plenty, gib = 64 << 30, 1 << 30
    assert [auto_workers("cpu", t, plenty) for t in (1, 2, 3, 16)] == [1, 2, 3, 4]
    # each worker holds its own models: with 5 GiB free, two workers, and with 1 GiB, this process alone
    assert auto_workers("cpu", 16, 5 * gib) == 2 and auto_workers("cpu", 16, gib) == 1
    assert auto_workers("cuda", 16, plenty) == 1 and auto_workers("mps", 8, plenty) == 1
    assert isinstance(executor_for("local", workers=1), LocalExecutor)
    ex = executor_for("local", workers=2)
    assert isinstance(ex, WorkerExecutor) and ex.threads == max(1, torch.get_num_threads() // 2)


@pytest.mark.parametrize("given, text", [
    ("0", "--workers: found '0', expected a whole number from 1 to 256, or auto"),
    ("two", "--workers: found 'two', expected a whole number from 1 to 256, or auto"),
])
def test_a_bad_worker_count_is_one_clear_message(tmp_path, capsys, given, text):
    spec = tmp_path / "spec.yaml"
    spec.write_text("title: t\nmodels: [{id: m, source: torchvision, name: resnet18, layers: [layer4]}]\n")
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--workers", given]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_workers_with_ray_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("title: t\nmodels: [{id: m, source: torchvision, name: resnet18, layers: [layer4]}]\n")
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--executor", "ray", "--workers", "2"]) == 2
    assert "--workers: given with --executor ray" in capsys.readouterr().err


def test_a_run_with_workers_equals_one_in_process_to_the_bit(tmp_path, ckpt):
    # two workers of one thread each against this process with one thread: the same sums, the same numbers
    from test_tasks import write_spec

    spec = write_spec(tmp_path, ckpt)
    # Network Dissection left out (its sharding is held equal to the bit in tests/test_tasks.py), to save time
    text = spec.read_text()
    spec.write_text(text[: text.index("netdissect:")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(spec), "--out", str(tmp_path / "one"), "--no-cache", "--workers", "1",
                     "--no-pdf"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["run", str(spec), "--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache"),
                 "--workers", "2", "--no-pdf"]) == 0
    runs = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert runs[1]["provenance"]["executor"].startswith("local (2 worker processes")
    # a worker has a share of the cores, so the report says where the methods were timed
    speed = [next(f["text"] for f in r["findings"] if f["id"] == "speed") for r in runs]
    assert "worker processes" not in speed[0] and "timed in one of 2 worker processes of 1 thread each" in speed[1]
    assert runs[1]["provenance"]["workers"] == {"processes": 2, "threads": 1} and "workers" not in runs[0]["provenance"]
    for r in runs:  # where it ran: the executor and its workers, the thread count in the device's line, the cache
        for key in ("executor", "workers", "device", "cache"):
            r["provenance"].pop(key, None)
    assert without_timings(runs[0]) == without_timings(runs[1])
    arrays = sorted((tmp_path / "one").glob("**/*.npz"))
    assert arrays  # the maps and activations behind the numbers, compared array by array
    for a in arrays:
        with np.load(a) as x, np.load(tmp_path / "two" / a.relative_to(tmp_path / "one")) as y:
            assert all(np.array_equal(x[k], y[k]) for k in x.files), a


def test_ctrl_c_stops_the_workers_with_the_run_and_writes_nothing(tmp_path, ckpt):
    # Ctrl-C in a terminal reaches the whole process group: the workers ignore it, the driver stops them
    import subprocess
    import sys

    from test_tasks import write_spec

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "report_builder", "run", str(write_spec(tmp_path, ckpt)), "--out",
                          str(out), "--cache-dir", str(tmp_path / "cache"), "--workers", "2"],
                         cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    computing = False
    for line in p.stderr:
        computing = computing or "] compute ..." in line
        if computing and line.rstrip().endswith("tasks ..."):  # the workers are up and running the first tasks
            break
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted; no output was written" in err and "Traceback" not in err, err
    assert not out.exists()
    deadline = time.monotonic() + 10
    while True:  # no worker outlives the run
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a worker process is still running"
        time.sleep(0.2)


def test_the_workers_variable_is_checked_like_the_flag(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text("title: t\nmodels: [{id: m, source: torchvision, name: resnet18, layers: [layer4]}]\n")
    monkeypatch.setenv("REPORT_BUILDER_WORKERS", "lots")
    assert main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    assert "REPORT_BUILDER_WORKERS: found 'lots', expected a whole number" in capsys.readouterr().err
