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
