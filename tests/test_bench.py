"""The benchmark's items run and their optimised paths agree with the baselines (timings are never asserted)."""
import torch

from report_builder.bench.rows import bench_activations, bench_soft_wpmi


def test_activations_in_one_pass_equal_one_pass_per_layer():
    (r,) = bench_activations(torch.device("cpu"), images=4)
    assert r["max_abs_diff"] == 0.0 and r["ours_s"] > 0 and r["baseline_s"] > 0


def test_vectorised_soft_wpmi_equals_the_per_unit_loop():
    (r,) = bench_soft_wpmi(units=12, concepts=40, images=150)
    assert r["max_abs_diff"] < 1e-4
