"""The benchmark's items run and their optimised paths agree with the baselines (timings are never asserted)."""
import torch

from report_builder.bench.rows import bench_activations, bench_soft_wpmi


def test_activations_in_one_pass_equal_one_pass_per_layer():
    (r,) = bench_activations(torch.device("cpu"), images=4)
    assert r["max_abs_diff"] == 0.0 and r["ours_s"] > 0 and r["baseline_s"] > 0


def test_vectorised_soft_wpmi_equals_the_per_unit_loop():
    (r,) = bench_soft_wpmi(units=12, concepts=40, images=150)
    assert r["max_abs_diff"] < 1e-4


def test_the_full_assignments_floors_count_its_passes_from_its_spec(monkeypatch):
    """specs/assignment4.yaml as written: 2 models x 10 images x 4 methods, 13 maps an image for deletion and ROAD,
    and a sanity check of 12 explanations per model and method (a walk of 4 steps, 2 more images, 2 more seeds on
    each of 3 images), whose first step LIME and ScoreCAM make from the explanation's kept inputs. With planted
    per-call costs the floors are the hand-computed sums."""
    from report_builder.bench import scale
    from report_builder.spec.schema import load_spec

    monkeypatch.setattr(scale, "resnet18_call_costs", lambda *_: (1.0, 10.0))  # a forward; Grad-CAM's pair
    monkeypatch.setattr(scale, "_ablation_seconds", lambda: 100.0)
    monkeypatch.setattr(scale, "_per_call", lambda fn, repeats: 0.5)  # each ROAD solve
    spec = load_spec("specs/assignment4.yaml").written.model_dump(mode="json")
    results = {"spec": spec, "models": [{}, {}], "images": [{}] * 10}
    floors, counts = scale.assignment_floors(results)
    explanation = 1000 + 513 + 10 + 100  # LIME's samples, ScoreCAM's masks and the intact image, Grad-CAM, AblationCAM
    assert floors["explain"] == 2 * 10 * explanation
    maps = 2 * 10 * (4 + 3 * 3)  # 4 methods; 3 draws of per-pixel noise and of 2 sizes of smooth noise
    tasks = 2 * 10 * (4 + 3)  # one evaluation task per method and per kind of chance map, each with its baseline
    # deletion and insertion's 19 steps between their ends, ROAD's 8 imputed images; then LeRF/MoRF solves
    assert floors["evaluate"] == maps * (2 * 19 + 2 * 4) + tasks + maps * 2 * 4 * 0.5
    # the walk's first step: LIME's and ScoreCAM's explanations run only the output block (ScoreCAM's target pass)
    assert floors["sanity"] == 2 * 12 * explanation - 2 * (1000 + 513 - 1)
    assert counts["sanity"] == "96 explanations, of which 4 run the output block alone"
    assert counts["evaluate"].startswith("260 maps x 46 passes, 140 baselines")


def test_concurrent_workers_share_the_images_out_and_stop_when_closed():
    """The forward rows' worker processes (one thread each, as the run's executor makes them): a round makes
    exactly the images asked for between them, rounds repeat, and closing stops every process cleanly."""
    from report_builder.bench.rows import ConcurrentWorkers

    pool = ConcurrentWorkers("efficientnet_lite0", 2, 5, 2)
    try:
        assert pool.shares == [3, 2]
        pool(), pool()
        assert all(p.is_alive() for p in pool.procs)
    finally:
        pool.close()
    assert [p.exitcode for p in pool.procs] == [0, 0]
