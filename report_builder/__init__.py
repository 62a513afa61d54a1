"""report_builder: explain what image classifiers learn — network dissection, saliency maps, LIME, a report.

Run `python -m report_builder --help`; the stages are one module each (spec, zoo, data, probe, concepts,
scorers, activations, dissect, explain, agreement, analysis, runner, render, diff, bench).
"""
__version__ = "0.1.0"
