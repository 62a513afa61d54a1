"""The content-keyed cache: hits on equal content, misses on any change, recovers from damage."""
import numpy as np

from report_builder.pipeline.cache import Cache, key_of


def test_same_parts_hit_changed_parts_miss(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"map": np.arange(4, dtype=np.float32), "seconds": 1.5}

    parts = {"weights": "aaa", "image": "bbb", "params": {"k": 1}}
    v1, cached1 = cache.get_or_compute("explain", parts, compute)
    v2, cached2 = cache.get_or_compute("explain", parts, compute)
    assert (cached1, cached2) == (False, True) and len(calls) == 1
    assert np.array_equal(v1["map"], v2["map"]) and v2["seconds"] == 1.5
    for changed in ({**parts, "weights": "aab"}, {**parts, "params": {"k": 2}}):
        _, cached = cache.get_or_compute("explain", changed, compute)
        assert not cached
    assert len(calls) == 3


def test_key_ignores_dict_order():
    assert key_of({"a": 1, "b": {"c": 2, "d": 3}}) == key_of({"b": {"d": 3, "c": 2}, "a": 1})


def test_damaged_entry_is_recomputed(tmp_path):
    cache = Cache(tmp_path)
    parts = {"x": 1}
    cache.get_or_compute("s", parts, lambda: {"v": 1})
    (entry,) = list(tmp_path.rglob("*.pt"))
    entry.write_bytes(b"garbage")
    value, cached = cache.get_or_compute("s", parts, lambda: {"v": 2})
    assert not cached and value == {"v": 2}


def test_disabled_cache_always_computes(tmp_path):
    cache = Cache(tmp_path, enabled=False)
    cache.get_or_compute("s", {"x": 1}, lambda: {"v": 1})
    _, cached = cache.get_or_compute("s", {"x": 1}, lambda: {"v": 1})
    assert not cached and not list(tmp_path.rglob("*.pt"))


def test_stored_files_come_back_as_written_and_only_plain_names_and_bytes_are_trusted(tmp_path):
    """Figures and unit strips are kept as files by name: what comes back is written into the run folder, so a
    name that is a path, a hidden name or values that are not bytes make the entry unusable (drawn again)."""
    cache = Cache(tmp_path)
    files = {"grid_coffee.jpg": b"\xff\xd8jpeg", "timings.png": b"\x89PNG", "empty.png": b""}
    cache.save_files("figures", "k1", files)
    assert cache.load_files("figures", "k1") == files
    assert (cache.hits, cache.misses) == (0, 0)  # not a task's entry: the run's counts are of tasks
    for name in ("../outside.png", "sub/inner.png", ".hidden"):
        cache.save_files("figures", "k2", {**files, name: b"x"})
        assert cache.load_files("figures", "k2") is None
    cache.save("figures", "k3", {"timings.png": np.zeros(3, np.float32)}, count=False)
    assert cache.load_files("figures", "k3") is None
    assert Cache(tmp_path, enabled=False).load_files("figures", "k1") is None
