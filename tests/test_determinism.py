"""Two cold runs of the end-to-end spec (one image, two methods) give the same results.json apart from timings. In
a file of its own so that pytest-xdist (one file per worker) can run it beside test_end_to_end.py's run."""
import json

from report_builder.__main__ import main
from report_builder.report.rundir import without_timings
from test_end_to_end import SPEC


def test_two_runs_give_the_same_results_except_timings(tmp_path):
    spec = tmp_path / "det.yaml"
    spec.write_text(SPEC.replace("images: {source: samples, names: [chelsea, voc]}",
                                 "images: {source: samples, names: [coffee]}")
                    .replace("  cam: {batch_size: 64}", "  methods: [gradcam, lime]\n  cam: {batch_size: 64}"))
    a, b = tmp_path / "a", tmp_path / "b"
    # results.json is compared, so the PDF is not printed (tests/test_end_to_end.py reads one)
    assert main(["run", str(spec), "--out", str(a), "--no-cache", "--no-pdf"]) == 0
    assert main(["run", str(spec), "--out", str(b), "--no-cache", "--no-pdf"]) == 0

    def strip(path):  # every number and sentence, except those marked as timings
        return without_timings(json.loads((path / "results.json").read_text()))

    assert strip(a) == strip(b)
