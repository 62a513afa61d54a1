"""Ray going wrong: an address with nothing (or not Ray) behind it, 'auto' with no cluster, a cluster that wants a
token, a model factory whose weights differ between processes, and a driver killed with kill -9. Each gives a clean
message and exit 2 within a bounded time, or leaves no process of its Ray behind. Loopback only, no network."""
from __future__ import annotations

import _socket
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from report_builder.pipeline import raywatch
from report_builder.pipeline import tasks
from report_builder.__main__ import main
from report_builder.errors import UserError

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent

SPEC = """
title: "Ray faults"
models:
  - {{id: net, source: checkpoint, name: mobilenet_v3_small, path: {ckpt}}}
images: {{source: samples, names: [coffee, chelsea]}}
explain: {{methods: [gradcam, lime], lime: {{num_samples: {samples}, batch_size: 20}}}}
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("spec")
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), folder / "net.pt")
    path = folder / "spec.yaml"
    path.write_text(SPEC.format(ckpt=folder / "net.pt", samples=20))
    return path


@pytest.fixture
def loopback(monkeypatch):
    """Let this test's sockets reach this machine (and only it): conftest turns every connect off."""
    real = _socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError("network disabled in tests (loopback only)")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ray(spec: Path, out: Path, address: str, capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    code = main(["run", str(spec), "--out", str(out), "--executor", "ray", "--ray-address", address])
    return code, capsys.readouterr().err, time.monotonic() - start


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_with_nothing_listening_fails_at_once(tmp_path, spec, loopback, capsys, scheme):
    address = f"{scheme}127.0.0.1:{free_port()}"
    code, err, seconds = run_ray(spec, tmp_path / "out", address, capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert f"--ray-address {address}: nothing is listening there" in err
    assert "ray start --head" in err and "check the address" in err
    assert seconds < 10  # refused at once; ray.init alone retries such an address for many minutes


def test_something_that_is_not_ray_fails_within_the_bound(tmp_path, spec, loopback, capsys):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(8)), daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        code, err, seconds = run_ray(spec, tmp_path / "out", address, capsys)
    finally:
        server.close()
    assert code == 2 and "Traceback" not in err
    assert f"--ray-address {address}: something is listening there but does not answer as a Ray head" in err
    assert f"within {tasks.RAY_CONNECT_S:g} s" in err and "ray start --head" in err
    assert seconds < 2 * tasks.RAY_CONNECT_S + 5


def test_auto_with_no_cluster_says_how_to_start_one(tmp_path, spec, loopback, capsys, monkeypatch):
    from ray._private import services

    def none_found(address, temp_dir=None):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", none_found)  # whatever runs on this machine
    code, err, seconds = run_ray(spec, tmp_path / "out", "auto", capsys)
    assert code == 2 and "Traceback" not in err and seconds < 10
    assert "--ray-address auto: no running Ray cluster was found on this machine" in err
    assert "ray start --head" in err


def test_auto_finding_a_stale_record_names_the_address(tmp_path, spec, loopback, capsys, monkeypatch):
    from ray._private import services

    stale = f"127.0.0.1:{free_port()}"  # the head `ray start` recorded, since stopped
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda address, temp_dir=None: stale)
    code, err, seconds = run_ray(spec, tmp_path / "out", "auto", capsys)
    assert code == 2 and "Traceback" not in err and seconds < 10
    assert f"--ray-address auto ({stale}): nothing is listening there" in err


def _grpc_server(refuse: bool):
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    def answer(request, context):
        if refuse:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")
        return b""

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_cluster_that_wants_a_token_is_named(loopback, scheme):
    server, port = _grpc_server(refuse=True)
    try:
        with pytest.raises(UserError, match="uses token authentication.*RAY_AUTH_MODE=token"):
            tasks.check_ray_address(f"{scheme}127.0.0.1:{port}")
    finally:
        server.stop(0)
    server, port = _grpc_server(refuse=False)
    try:
        assert tasks.check_ray_address(f"{scheme}127.0.0.1:{port}") == f"{scheme}127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "127.0.0.1:port", "127.0.0.1:70000"])
def test_an_address_of_another_form_says_which_forms_work(address):
    with pytest.raises(UserError, match="expected 'auto', host:port .* or ray://host:port"):
        tasks.check_ray_address(address)


# ---------------------------------------------------------------- a factory with unseeded weights

FACTORY = '''
from torch import nn


def build_model():  # no torch.manual_seed: new random weights every time it runs
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3))
    return {"model": model, "classes": ["a", "b", "c"],
            "preprocess": {"input_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.25] * 3}}
'''

PY_SPEC = """
models:
  - {id: mine, source: python, factory: "model_def.py:build_model", target_layer: "0"}
images: {source: samples, names: [chelsea]}
explain: {methods: [lime], lime: {num_samples: 20, batch_size: 20}}
"""


@pytest.mark.slow
def test_an_unseeded_factory_names_the_cause_and_the_cure(tmp_path, capsys, monkeypatch):
    """A local Ray started for the run: the workers build the model again and get other weights. The run stops
    with the model, both hashes and what to do; and the Ray it started is gone, watchdog included, when it returns."""
    (tmp_path / "model_def.py").write_text(FACTORY)
    (tmp_path / "py.yaml").write_text(PY_SPEC)
    mark = uuid.uuid4().hex
    monkeypatch.setattr(tasks, "uuid", SimpleNamespace(uuid4=lambda: SimpleNamespace(hex=mark)))
    assert not ray.is_initialized()
    code = main(["run", str(tmp_path / "py.yaml"), "--out", str(tmp_path / "out"), "--executor", "ray",
                 "--no-cache", "--allow-code"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "models[0]: the weights of model 'mine' differ between processes" in line
    hashes = re.findall(r"\b[0-9a-f]{12}\b", line)
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    assert "torch.manual_seed" in line and "models[0].path" in line and "run again" not in line
    assert not ray.is_initialized() and raywatch.MARK_VARIABLE not in os.environ
    assert _left(f"{raywatch.MARK_VARIABLE}={mark}") == []


# ---------------------------------------------------------------- a driver killed with kill -9


def _left(entry: str) -> list[str]:
    """The command lines of the processes whose environment holds `entry`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.encode() in environ.split(b"\0"):
            found.append(f"{pid} {cmdline.strip()[:100]}")
    return found


def _wait_gone(entry: str, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _left(entry)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _kill_all(entry: str) -> None:
    for line in _left(entry):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass


def test_the_watchdog_stops_only_the_processes_of_its_run(tmp_path):
    """Three sleepers: one marked for this run, one for another run, one unmarked (a user's own cluster). When the
    driver (this test) is done, only the first is stopped."""
    mark, other = uuid.uuid4().hex, uuid.uuid4().hex
    sleepers = {name: subprocess.Popen(["sleep", "60"], env={**os.environ, **extra})
                for name, extra in [("ours", {raywatch.MARK_VARIABLE: mark}),
                                    ("another run's", {raywatch.MARK_VARIABLE: other}), ("the user's", {})]}
    try:
        dog = subprocess.Popen([sys.executable, "-m", "report_builder.pipeline.raywatch", mark, str(os.getpid())],
                               stdin=subprocess.PIPE, cwd=REPO)
        time.sleep(0.5)
        assert dog.poll() is None  # waits while the driver lives
        dog.stdin.close()  # the driver is done (or died: the same end of file)
        assert dog.wait(timeout=10) == 0
        assert sleepers["ours"].wait(timeout=5) == -signal.SIGTERM
        assert sleepers["another run's"].poll() is None and sleepers["the user's"].poll() is None
    finally:
        for p in sleepers.values():
            p.kill()
            p.wait()


def test_the_watchdog_stops_a_process_whose_environment_vanished(tmp_path):
    """A marked process whose main thread ended while another runs on (Ray's runtime-env agent after its raylet
    died, shutting down for a minute): /proc shows its main thread as a zombie and its environment no longer reads,
    so a search for the mark misses it. The watchdog saw it while it showed the mark and stops it all the same."""
    mark = uuid.uuid4().hex
    lingering = ("import ctypes, threading, time\n"
                 "threading.Thread(target=time.sleep, args=(60,)).start()\n"
                 "time.sleep(1.0)\n"
                 "ctypes.CDLL(None).pthread_exit(None)  # the main thread ends, the process lives on\n")
    dog = subprocess.Popen([sys.executable, "-m", "report_builder.pipeline.raywatch", mark, str(os.getpid())],
                           stdin=subprocess.PIPE, cwd=REPO)
    agent = subprocess.Popen([sys.executable, "-c", lingering], env={**os.environ, raywatch.MARK_VARIABLE: mark})
    try:
        deadline = time.monotonic() + 10
        while raywatch.marked(mark) == [agent.pid] and time.monotonic() < deadline:
            time.sleep(0.1)  # until its environment stops showing the mark
        assert raywatch.marked(mark) == [] and agent.poll() is None and raywatch.start_time(agent.pid) is not None
        dog.stdin.close()
        assert dog.wait(timeout=raywatch.SWEEP_BOUND_S + 5) == 0
        assert agent.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
    finally:
        agent.kill()
        agent.wait()
        dog.kill()
        dog.wait()


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path, spec):
    """kill -9 of a run's driver once its local Ray is up: every process that Ray started (found by a variable
    only this run's environment holds, and remembered by pid and start time while it showed it) is gone within a
    bounded time. Ray's runtime-env agent can stop showing its environment while it lingers for a minute after its
    raylet, so looking for the variable alone after the kill would miss it."""
    tag = f"RB_TEST_RUN={uuid.uuid4().hex}"
    long_spec = tmp_path / "long.yaml"
    long_spec.write_text(spec.read_text().replace("num_samples: 20", "num_samples: 3000"))
    log = tmp_path / "raywatch.log"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1], "RAY_USAGE_STATS_ENABLED": "0",
           "TORCH_HOME": str(tmp_path / "torch"), "REPORT_BUILDER_CACHE": str(tmp_path / "cache"),
           "REPORT_BUILDER_RAYWATCH_LOG": str(log)}
    env.pop(raywatch.MARK_VARIABLE, None)
    driver = subprocess.Popen([sys.executable, "-m", "report_builder", "run", str(long_spec), "--out",
                               str(tmp_path / "out"), "--executor", "ray", "--no-cache"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started: dict[int, tuple[int, str]] = {}  # every process of the run seen alive: pid -> (start time, command)

    def look() -> list[str]:
        found = _left(tag)
        for line in found:
            pid = int(line.split()[0])
            if pid not in started and (t := raywatch.start_time(pid)) is not None:
                started[pid] = (t, line)
        return found

    try:
        lines = []
        for line in driver.stdout:  # the executor line comes once ray.init has returned
            lines.append(line)
            if "executor ray (" in line:
                break
        else:
            pytest.fail("the run ended before Ray was up:\n" + "".join(lines))
        assert any("raylet" in p for p in look()), _left(tag)
        # Ray's dashboard and runtime-env agents come up last; they are what a killed driver left running for good
        deadline = time.monotonic() + 15
        while sum("Agent" in p for p in look()) < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        time.sleep(1)
        look()
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + raywatch.SWEEP_BOUND_S + raywatch.GRACE_S  # the watchdog's own bound
        while (alive := [c for pid, (t, c) in started.items() if raywatch.start_time(pid) == t]) and \
                time.monotonic() < deadline:
            time.sleep(0.25)
        what = log.read_text() if log.exists() else "(no watchdog log)"
        assert alive == [], f"still running after kill -9 of the driver: {alive}\nwatchdog:\n{what}"
        assert _left(tag) == []
    finally:
        driver.kill()
        driver.wait()
        _kill_all(tag)
        for pid, (t, _) in started.items():
            if raywatch.start_time(pid) == t:
                os.kill(pid, signal.SIGKILL)
