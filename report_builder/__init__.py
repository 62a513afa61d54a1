"""report_builder: explain what image classifiers learn — network dissection, saliency maps, LIME, a report.

In a notebook:

    from report_builder import open_run, run
    r = open_run("output/demo")        # a run directory's tables as pandas DataFrames
    r.units.head()
    s = run("specs/my.yaml")            # run a study, then open it

On the command line: `report-builder --help` (or `python -m report_builder --help`). The stages are one package
each (spec, models, data, dissection, explanation, evaluation, pipeline, report, bench); stats holds the intervals
and tests every finding states.
"""
__version__ = "0.3.0"


def open_run(path):
    """A run directory as pandas tables: see report_builder.report.api.Run."""
    from report_builder.report.api import open_run as _open_run

    return _open_run(path)


def run(spec, out=None, **kwargs):
    """Run a spec (a file, or a dict as the YAML would be) and open the run: see report_builder.report.api.run. A spec that
    names Python code (source: python) needs allow_code=True, or allow_code_from=[folder] for a file elsewhere."""
    from report_builder.report.api import run as _run

    return _run(spec, out, **kwargs)


__all__ = ["open_run", "run", "__version__"]
