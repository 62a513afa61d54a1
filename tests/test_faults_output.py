"""Output folders and the cache under faults: no file of the user's is ever lost (a rerun, render, diff, a full or
read-only disk, too little memory, Ctrl-C, SIGTERM, kill -9), and a cache entry is never trusted unchecked
(flipped bytes, another structure, another key, concurrent runs). Split from test_faults.py so the two halves
run on two workers."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from report_builder.__main__ import main
from report_builder.pipeline.cache import Cache, stage_key
from report_builder.errors import UserError
from report_builder.report.rundir import without_timings

from faults_common import REPO, WITH_LAYER, _launch, good_run, run_cli, snapshot, spec_file  # noqa: F401 - fixtures are found by name


# ---------------------------------------------------------------- output folders: nothing of the user's is lost


def test_run_never_replaces_a_folder_of_the_users(tmp_path, capsys, ckpt):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    before = snapshot(mine)
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", mine)
    assert code == 2 and "did not write (thesis.tex)" in err and "left untouched" in err
    assert snapshot(mine) == before


def test_run_never_replaces_a_file(tmp_path, capsys, ckpt):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", target)
    assert code == 2 and "is a file" in err
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "spec.yaml"]
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", target / "run")
    assert code == 2 and "is inside" in err and "which is a file" in err


USERS_FILES = {".git/HEAD": "ref: refs/heads/main\n", ".notes.md": "mine", "my-notes.md": "mine too",
               "figures/extra.png": "my own figure", "figures/my_notes.txt": "about the figures",
               "explanations/net/keep.txt": "keep", ".env": "TOKEN=1"}


def _add_users_files(run: Path) -> None:
    for rel, text in USERS_FILES.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)


def _users_files(run: Path) -> dict[str, str]:
    return {rel: (run / rel).read_text() for rel in USERS_FILES if (run / rel).is_file()}


def test_a_rerun_replaces_only_what_it_wrote_and_keeps_the_users_files(tmp_path, capsys, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _add_users_files(run)
    (run / "report.pdf").write_text("stale")
    code, err = run_cli(capsys, "run", good_run.parent / "spec.yaml", "--out", run)
    assert code == 0, err
    assert _users_files(run) == USERS_FILES  # .git, hidden notes, a figure and a file among the explanations
    assert (run / "report.pdf").read_bytes().startswith(b"%PDF")
    marker = json.loads((run / ".report_builder").read_text())
    assert marker["kind"] == "run" and "results.json" in marker["files"]
    assert not set(USERS_FILES) & set(marker["files"])  # the user's files never become ours
    hidden = {p.name for p in run.iterdir() if p.name.startswith(".")}
    assert hidden == {".git", ".notes.md", ".env", ".report_builder"}  # no work folder left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_render_replaces_only_its_own_files(tmp_path, capsys, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _add_users_files(run)
    ours = {rel: (run / rel).read_bytes() for rel in json.loads((run / ".report_builder").read_text())["files"]
            if not rel.startswith("figures/") and rel not in ("report.html", "report.pdf", "units.html")}
    code, err = run_cli(capsys, "render", run)
    assert code == 0, err
    assert _users_files(run) == USERS_FILES
    assert {rel: (run / rel).read_bytes() for rel in ours} == ours  # results, CSVs, overlays: not touched
    assert [p.name for p in run.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


def test_no_pdf_leaves_no_older_pdf_behind_and_render_writes_it_later(tmp_path, capsys, good_run):
    # a PDF beside a report is always of the same results: a rerun or re-render without one removes the older one
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _add_users_files(run)
    code, err = run_cli(capsys, "run", good_run.parent / "spec.yaml", "--out", run, "--no-pdf")
    assert code == 0, err
    assert (run / "report.html").is_file() and not (run / "report.pdf").exists()
    assert "report.pdf" not in json.loads((run / ".report_builder").read_text())["files"]
    assert _users_files(run) == USERS_FILES
    code, err = run_cli(capsys, "render", run)
    assert code == 0, err
    assert (run / "report.pdf").read_bytes().startswith(b"%PDF")
    html = (run / "report.html").read_bytes()
    code, err = run_cli(capsys, "render", run, "--no-pdf")
    assert code == 0, err
    assert not (run / "report.pdf").exists() and (run / "report.html").read_bytes() == html
    assert _users_files(run) == USERS_FILES


@pytest.mark.parametrize("found", ["results.json", "diff.json"])
def test_another_tools_results_json_does_not_make_a_folder_ours(tmp_path, capsys, good_run, found):
    other = tmp_path / "other"
    other.mkdir()
    (other / found).write_text(json.dumps({"schema_version": 1, "accuracy": 0.9}))
    (other / ".env").write_text("SECRET=1")
    (other / ".git").mkdir()
    (other / ".git" / "HEAD").write_text("ref")
    before = snapshot(other)
    if found == "results.json":
        code, err = run_cli(capsys, "run", good_run.parent / "spec.yaml", "--out", other)
    else:
        code, err = run_cli(capsys, "diff", good_run, good_run, "--out", other)
    assert code == 2 and "did not write" in err and "left untouched" in err
    assert snapshot(other) == before


def test_a_run_folder_of_an_older_version_without_a_file_list_is_left_alone(tmp_path, capsys, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (run / ".report_builder").write_text(json.dumps({"kind": "run"}))  # what versions before the manifest wrote
    (run / "explanations" / "net" / "keep.txt").write_text("keep")
    before = snapshot(run)
    code, err = run_cli(capsys, "run", good_run.parent / "spec.yaml", "--out", run)
    assert code == 2 and "kept no list of the files it wrote" in err
    code, err = run_cli(capsys, "render", run)
    assert code == 2 and "kept no list" in err
    assert snapshot(run) == before


def _ours(folder: Path, files: dict[str, str], kind: str = "run") -> None:
    from report_builder.files import write_marker

    folder.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    write_marker(folder, kind, files)


def test_replacing_refuses_to_write_over_a_users_file(tmp_path):
    from report_builder.files import replace_ours

    target, work = tmp_path / "run", tmp_path / "work"
    _ours(target, {"results.json": "old", "a/x.png": "old"})
    (target / "a" / "y.png").write_text("the user's")  # where the new run writes a file of its own
    (target / "b").write_text("the user's file, where the new run makes a folder")
    before = snapshot(target)
    for rel in ("results.json", "a/x.png", "a/y.png", "b/z.png"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text("new")
    with pytest.raises(UserError, match=r"holds files of yours where this run writes its own \(a/y.png, b/z.png\)"):
        replace_ours(target, work, "run", first="results.json")
    assert snapshot(target) == before


def test_replacing_never_follows_a_link_out_of_the_run(tmp_path):
    from report_builder.files import replace_ours

    target, work, elsewhere = tmp_path / "run", tmp_path / "work", tmp_path / "elsewhere"
    _ours(target, {"results.json": "old", "figures/x.png": "old"})
    shutil.rmtree(target / "figures")
    elsewhere.mkdir()
    (elsewhere / "x.png").write_text("someone else's")
    (target / "figures").symlink_to(elsewhere)
    (work / "figures").mkdir(parents=True)
    (work / "figures" / "x.png").write_text("new")
    (work / "results.json").write_text("new")
    with pytest.raises(UserError, match="figures is a symbolic link"):
        replace_ours(target, work, "run")
    assert (elsewhere / "x.png").read_text() == "someone else's"


def test_a_replacement_cut_short_loses_nothing_and_the_next_one_completes(tmp_path, monkeypatch):
    """A kill in the middle of replacing a run (simulated: the fifth move fails): the target is still there, every
    file in it is one the marker calls ours or the user's own, and the next run finishes the job."""
    from report_builder import files

    target = tmp_path / "run"
    _ours(target, {"results.json": "old", "report.html": "old", "figures/a.png": "old", "figures/b.png": "old"})
    (target / "figures" / "mine.txt").write_text("the user's")

    def new_work() -> Path:
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        for rel in ("results.json", "report.html", "figures/a.png", "figures/c.png"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text("new")
        return work

    real_move, moves = files._move, []

    def dying_move(src, dst):
        moves.append(src)
        if len(moves) == 5:
            raise KeyboardInterrupt
        real_move(src, dst)

    monkeypatch.setattr(files, "_move", dying_move)
    with pytest.raises(KeyboardInterrupt):
        files.replace_ours(target, new_work(), "run", first="results.json")
    monkeypatch.setattr(files, "_move", real_move)
    assert target.is_dir() and not (target / "results.json").exists()  # never read as a whole run
    listed = set(json.loads((target / ".report_builder").read_text())["files"])
    present = {rel for rel in files.files_under(target) if not rel.startswith(".")}
    assert present - listed == {"figures/mine.txt"}
    leftover = next(target.glob(".run.old-*"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (leftover / ".owner").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    work = files.partial_folder(target, "run")  # as the next run does: it removes the ended run's leftovers
    assert not leftover.exists()
    shutil.rmtree(work)
    files.replace_ours(target, new_work(), "run", first="results.json")
    assert {rel: (target / rel).read_text() for rel in files.files_under(target)} == {
        "results.json": "new", "report.html": "new", "figures/a.png": "new", "figures/c.png": "new",
        "figures/mine.txt": "the user's"}
    assert json.loads((target / ".report_builder").read_text())["files"] == [
        "figures/a.png", "figures/c.png", "report.html", "results.json"]


def test_out_dot_in_an_empty_folder_and_a_cache_inside_the_output(tmp_path, capsys, ckpt, monkeypatch):
    spec = spec_file(tmp_path, ckpt)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    start = time.perf_counter()
    code, err = run_cli(capsys, "run", spec, "--out", ".", "--cache-dir", "cache")
    assert code == 2 and "--cache-dir cache: is inside the output folder ." in err
    assert time.perf_counter() - start < 10 and list(here.iterdir()) == []  # refused before any work
    code, err = run_cli(capsys, "run", spec, "--out", ".", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert (here / "report.pdf").is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code, err = run_cli(capsys, "render", spec)
    assert code == 2 and "is a file, not a run directory" in err and "use 'run'" in err


@pytest.mark.parametrize("where", ["A itself", "inside A", "B itself", "an existing run"])
def test_diff_never_writes_onto_its_inputs_or_another_run(tmp_path, capsys, good_run, where):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(good_run, a)
    shutil.copytree(good_run, b)
    other = tmp_path / "other"
    shutil.copytree(good_run, other)
    out = {"A itself": a, "inside A": a / "figures", "B itself": b, "an existing run": other}[where]
    before = {p: snapshot(p) for p in (a, b, other)}
    code, err = run_cli(capsys, "diff", a, b, "--out", out)
    assert code == 2 and ("overlaps the input" in err or "not a diff folder" in err), err
    assert {p: snapshot(p) for p in (a, b, other)} == before


def test_diff_out_under_a_file(tmp_path, capsys, good_run):
    (tmp_path / "f").write_text("x")
    code, err = run_cli(capsys, "diff", good_run, good_run, "--out", tmp_path / "f" / "d")
    assert code == 2 and "which is a file" in err


def test_stale_partial_folders_of_ended_runs_are_removed(tmp_path, capsys, ckpt):
    out = tmp_path / "out" / "run"
    out.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out.parent / f".run.partial-{dead.pid}"
    stale.mkdir()
    (stale / ".owner").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    live = out.parent / f".run.partial-{os.getppid()}"  # a process that is alive: perhaps another run in flight
    live.mkdir()
    (live / ".owner").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid()}))
    strange = out.parent / ".run.partial-77"  # no owner file: not ours to judge
    strange.mkdir()
    code, _ = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", out)
    assert code == 0
    assert not stale.exists() and live.exists() and strange.exists()


def test_a_full_disk_while_rendering_leaves_nothing_behind(tmp_path, capsys, ckpt, monkeypatch):
    import errno

    from report_builder.report import render

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "report.pdf"))

    monkeypatch.setattr(render, "write_pdf", full)
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", tmp_path / "out" / "run")
    assert code == 2 and "the disk is full" in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the simulated case below covers it")
def test_a_read_only_output_folder(tmp_path, capsys, ckpt):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", parent / "run")
    finally:
        parent.chmod(0o755)
    assert code == 2 and "permission denied" in err


def test_a_read_only_output_folder_simulated(tmp_path, capsys, ckpt, monkeypatch):
    import errno

    from report_builder import files

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(files, "owned_folder", read_only)
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", tmp_path / "run")
    assert code == 2 and "the file system is read-only" in err and not (tmp_path / "run").exists()


def test_quiet_and_verbose_after_the_command_and_a_version(tmp_path, capsys, ckpt):
    spec = spec_file(tmp_path, ckpt, images="{source: samples, names: [coffee]}")
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("report_builder ")
    code, err = run_cli(capsys, "run", spec, "--out", tmp_path / "run", "-q")
    assert code == 0 and err == ""
    code, err = run_cli(capsys, "-q", "run", spec, "--out", tmp_path / "run")
    assert code == 0 and err == ""
    code, err = run_cli(capsys, "validate", spec, "-v")
    assert code == 0


def test_a_full_disk_that_names_no_file_names_the_folders(tmp_path, capsys, ckpt, monkeypatch):
    import errno

    from report_builder.pipeline import collect

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() on an open file says it

    monkeypatch.setattr(collect, "results", full)
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", tmp_path / "run", "--cache-dir",
                        tmp_path / "cache")
    assert code == 2 and "the disk is full" in err
    assert f"the output folder {tmp_path / 'run'} or the cache {tmp_path / 'cache'}" in err
    assert not (tmp_path / "run").exists()


def test_too_little_memory_is_a_clear_exit_2(tmp_path, capsys, ckpt, monkeypatch):
    from report_builder.pipeline import runner

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4000000000 bytes")

    monkeypatch.setattr(runner, "build_graph", no_memory)
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", tmp_path / "run")
    assert code == 2 and "error: out of memory" in err and not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a shell's ulimit")
def test_a_memory_cap_too_small_for_torch_is_exit_2(tmp_path):
    p = subprocess.run(["bash", "-c", f"ulimit -v 1500000; exec {sys.executable} -m report_builder run "
                        f"{REPO / 'specs' / 'demo.yaml'} --out {tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "out of memory" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_that_lands_in_a_callback_still_stops_render(tmp_path, capsys, good_run, monkeypatch):
    """Python drops an exception raised in a weakref callback (it prints 'Exception ignored'); the signal is
    recorded, and render stops before it replaces the report."""
    import weakref

    from report_builder import errors
    from report_builder.report import render

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = snapshot(run)
    real = render.make_figures

    class Thing:
        pass

    def figures_then_signal(*args, **kwargs):
        out = real(*args, **kwargs)
        thing = Thing()
        ref = weakref.ref(thing, lambda _: errors._on_signal(signal.SIGINT, None))
        del thing  # the callback runs now, and its KeyboardInterrupt is swallowed
        assert ref() is None
        return out

    monkeypatch.setattr(render, "make_figures", figures_then_signal)
    code, err = run_cli(capsys, "render", run)
    assert code == 130 and "interrupted" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("surfaced_as", [ImportError("initialization failed"), OSError(5, "Input/output error"),
                                         UserError("bad file")])
def test_a_signal_that_surfaces_as_another_error_is_still_an_interruption(tmp_path, capsys, good_run, monkeypatch,
                                                                         surfaced_as):
    """SIGTERM landing while a C extension is imported comes out as `ImportError: initialization failed` (seen in a
    full test run: matplotlib's Agg backend being loaded by render); any error raised while a signal is pending is
    the signal's doing: exit 143, the words of an interruption, no traceback, the run directory as it was."""
    from report_builder import errors
    from report_builder.report import render

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = snapshot(run)

    def signal_inside_an_import(*args, **kwargs):
        try:
            errors._on_signal(signal.SIGTERM, None)
        except errors.Interrupted as exc:
            raise surfaced_as from exc

    monkeypatch.setattr(render, "make_figures", signal_inside_an_import)
    code, err = run_cli(capsys, "render", run)
    assert code == 143 and "terminated (SIGTERM); no output was written" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, ckpt, good_run):
    spec = good_run.parent / "spec.yaml"
    out, cache = tmp_path / "out" / "run", tmp_path / "cache"
    p = _launch(spec, out, cache)
    deadline = time.monotonic() + 240
    for line in p.stderr:
        if "] render report ..." in line:  # the partial folder is being written
            break
        assert time.monotonic() < deadline
    assert [q.name for q in out.parent.iterdir()][0].startswith(".run.partial-")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err, err
    assert list(out.parent.iterdir()) == []  # no .run.partial-PID left behind


def test_a_half_written_cache_entry_of_a_killed_run_is_removed(tmp_path):
    cache = Cache(tmp_path)
    cache.save("stage", "ab" * 32, {"x": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = next((tmp_path / "stage").iterdir())
    host = os.uname().nodename.replace(".", "_")
    stale = folder / f".{host}-{dead.pid}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    live = folder / f".{host}-{os.getppid()}.def456.tmp"  # another run, still writing
    live.write_bytes(b"y")
    foreign = folder / ".otherhost-1.xyz.tmp"  # another machine's: not ours to judge
    foreign.write_bytes(b"z")
    assert cache.remove_stale_temporaries() == 1
    assert not stale.exists() and live.exists() and foreign.exists()
    assert cache.load("stage", "ab" * 32) == {"x": 1}


def test_offline_start_up_names_each_missing_file_within_seconds(tmp_path, capsys, monkeypatch):
    """No weights in the cache and no network: one line per missing file, no retries (huggingface_hub would try
    five times with back-off), whether HF_HUB_OFFLINE is set or the hub simply does not answer."""
    from report_builder import network

    spec = tmp_path / "spec.yaml"
    spec.write_text(WITH_LAYER.replace("source: packaged, name: efficientnet_lite0",
                                       "source: timm, name: resnet18.a1_in1k")
                    .replace("layers: [blocks.6]", "layers: [layer4]")
                    + "dissect: {probe: {source: samples-augmented, per_image: 1}, "
                      "scorers: [{kind: clip, model: RN50, pretrained: openai}]}\n")
    for offline in (True, False):
        network._decided.clear()
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        else:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        start = time.perf_counter()
        code, err = run_cli(capsys, "validate", spec)
        assert code == 2 and time.perf_counter() - start < 30, err
        assert "Retrying" not in err and "WARNING" not in err and "ERROR:" not in err
        reason = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached"
        assert f"models[0]: could not fetch pretrained weights for timm model 'resnet18.a1_in1k' (not in the local " \
               f"cache and {reason})" in err
        assert f"dissect.scorers[0]: could not load CLIP RN50 / openai (the weights are not in the local cache and " \
               f"{reason})" in err


def test_the_readme_names_exactly_the_methods_the_spec_takes():
    from report_builder.spec.schema import ALL_METHODS

    text = (REPO / "README.md").read_text()
    start = text.index("`explain.methods` takes any of")
    listed = re.findall(r"`([a-z+]+)`", text[start : text.index("or `all`", start)])
    assert sorted(listed) == sorted(ALL_METHODS)


# ---------------------------------------------------------------- the cache


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, capsys, ckpt):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    code, err = run_cli(capsys, "run", spec_file(tmp_path, ckpt), "--out", tmp_path / "run", "--cache-dir", blocked)
    assert code == 0 and "cannot be written" in err and "without caching" in err
    assert err.count("cannot be written") == 1  # said once


def test_flipped_bytes_in_a_cache_entry_are_caught(tmp_path):
    cache = Cache(tmp_path)
    said = []
    cache.warn_to = said.append
    value = {"map": np.linspace(0, 1, 1393, dtype=np.float32), "seconds": 1.0}
    cache.get_or_compute("explain", {"x": 1}, lambda: value)
    (entry,) = tmp_path.rglob("*.pt")
    data = bytearray(entry.read_bytes())
    data[-200] ^= 0x01  # one bit inside the payload: the entry still unpickles, with a wrong value
    entry.write_bytes(bytes(data))
    again, cached = cache.get_or_compute("explain", {"x": 1}, lambda: value)
    assert not cached and np.array_equal(again["map"], value["map"])
    assert len(said) == 1 and "failed its checksum" in said[0]


def test_a_cache_entry_of_another_structure_is_a_miss(tmp_path):
    cache = Cache(tmp_path)
    key = stage_key("explain", {"x": 1})
    cache.save("explain", key, ["not", "a", "map"])  # right key, valid checksum, wrong structure
    shape = {"map": np.ndarray, "seconds": float}
    value, cached = cache.get_or_compute("explain", {"x": 1}, lambda: {"map": np.zeros(2), "seconds": 0.5}, shape)
    assert not cached and value["seconds"] == 0.5


def test_a_cache_entry_copied_to_another_key_is_a_miss(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_compute("s", {"x": 1}, lambda: {"v": 1})
    cache.get_or_compute("s", {"x": 2}, lambda: {"v": 2})
    one, two = (cache._path("s", stage_key("s", {"x": i})) for i in (1, 2))
    shutil.copy(one, two)
    value, cached = cache.get_or_compute("s", {"x": 2}, lambda: {"v": 2})
    assert not cached and value == {"v": 2}


def test_a_corrupted_cache_gives_the_same_results(tmp_path, capsys, ckpt):
    spec = spec_file(tmp_path, ckpt)
    cache = tmp_path / "cache"
    assert main(["run", str(spec), "--out", str(tmp_path / "a"), "--cache-dir", str(cache)]) == 0
    for entry in (cache / "explain").rglob("*.pt"):
        data = bytearray(entry.read_bytes())
        data[-100] ^= 0x10
        entry.write_bytes(bytes(data))
    code, err = run_cli(capsys, "run", spec, "--out", tmp_path / "b", "--cache-dir", cache)
    assert code == 0 and "failed its checksum" in err
    assert without_timings(json.loads((tmp_path / "a" / "results.json").read_text())) == \
        without_timings(json.loads((tmp_path / "b" / "results.json").read_text()))


def test_two_concurrent_runs_on_one_cache(tmp_path, ckpt):
    spec = spec_file(tmp_path, ckpt)
    cache = tmp_path / "cache"
    runs = [_launch(spec, tmp_path / f"r{i}", cache) for i in range(2)]
    for p in runs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = (json.loads((tmp_path / f"r{i}" / "results.json").read_text()) for i in range(2))
    assert without_timings(a) == without_timings(b)


@pytest.mark.parametrize("stage", ["load models", "explain", "render report"])
def test_kill_minus_nine_then_rerun_gives_identical_results(tmp_path, good_run, stage):
    spec = good_run.parent / "spec.yaml"  # the reference run's own spec file
    out, cache = tmp_path / "out" / "run", tmp_path / "cache"
    p = _launch(spec, out, cache)
    marker = {"load models": "] load models ...", "explain": "] explain: ", "render report": "] render report ..."}[stage]
    deadline = time.monotonic() + 240
    for line in p.stderr:  # progress lines: "[   1.2s] explain: 4 tasks ..."
        if marker in line:
            break
        assert time.monotonic() < deadline
    else:
        pytest.fail(f"the run ended before {marker!r}")
    if stage == "explain":
        time.sleep(0.5)  # in the middle of the explanations
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()  # nothing half-written where the user looks
    rerun = _launch(spec, out, cache)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert list(out.parent.iterdir()) == [out]  # the killed run's partial folder is gone
    assert without_timings(json.loads((out / "results.json").read_text())) == \
        without_timings(json.loads((good_run / "results.json").read_text()))

