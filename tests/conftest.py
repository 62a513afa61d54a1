"""Shared fixtures: small models built here, a private cache, and no network."""
from __future__ import annotations

import os
import socket
from pathlib import Path

# Under pytest-xdist (make test: one worker per core) each worker, and every run a test starts in a subprocess,
# gets one torch thread: two workers with a thread per core each would fight for the cores, and OpenMP threads that
# wait for a descheduled peer spin. Set before torch is imported, so its thread pool and the children's follow.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn

from report_builder.spec.schema import ModelSpec  # noqa: E402
from report_builder.models.zoo import LoadedModel, Preprocess, weights_hash  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# The files that take longest (seconds of one worker, measured 2026-12-02), first. pytest-xdist hands out one file at a
# time in collection order (with --no-loadscope-reorder; by default it puts the files with the most tests first, which
# left the 16 tests of test_tasks.py, 170 s, for the end while the other worker idled): longest first, the two
# workers finish together. Within a file, and for the files not listed, the order stays as collected.
LONGEST_FIRST = ("test_faults_output.py", "test_end_to_end.py", "test_tasks.py", "test_architectures.py",
                 "test_diff.py", "test_workers.py", "test_determinism.py", "test_faults_ray.py", "test_package.py",
                 "test_zoo.py", "test_faults_rundir.py", "test_faults.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def _offline_and_private(tmp_path_factory):
    """For the whole session: a private cache and torch hub folder, and any network use fails loudly.

    Session scope, so that module-scoped fixtures (which run before function-scoped ones) are covered too.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPORT_BUILDER_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        # runs in this process, so that a test's monkeypatched model or source is the one that runs (a worker
        # process would import its own); tests/test_workers.py asks for workers by name
        mp.setenv("REPORT_BUILDER_WORKERS", "1")

        def no_network(*args, **kwargs):
            raise OSError("network disabled in tests")

        mp.setattr(socket.socket, "connect", no_network)
        yield


@pytest.fixture(autouse=True)
def _fresh_dirs(tmp_path_factory, monkeypatch):
    """Each test function starts with an empty cache and an empty torch hub folder."""
    monkeypatch.setenv("REPORT_BUILDER_CACHE", str(tmp_path_factory.mktemp("cache")))
    hub = str(tmp_path_factory.mktemp("hub"))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(hub)
    yield
    torch.hub.set_dir(previous)


class TinyNet(nn.Module):
    """A few conv layers and a linear head: fast enough to explain in milliseconds."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def wrap(module: nn.Module, size: int = 32, classes: int = 3, layer: str = "features") -> LoadedModel:
    module = module.eval()
    spec = ModelSpec(id="tiny", source="checkpoint", name="tiny", path="tiny.pt")
    pre = Preprocess(size, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    m = LoadedModel(spec, module, pre, [f"class{i}" for i in range(classes)], "built in the test")
    m.target_layer = layer
    m.weights_hash = weights_hash(module)
    m.layer_names = [n for n, _ in module.named_modules() if n]
    return m


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A randomly initialised MobileNetV3-Small checkpoint, as torchvision writes one: the fault and task tests' model."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return path


@pytest.fixture
def tiny_model() -> LoadedModel:
    torch.manual_seed(0)
    return wrap(TinyNet())


@pytest.fixture
def tiny_crop() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
