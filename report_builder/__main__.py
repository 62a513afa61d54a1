"""Command line: `report-builder {run,validate,render,diff} ...` (also `python -m report_builder`)."""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

from report_builder.errors import UserError, pending_signal, signals_interrupt

DEMO_SPEC = Path(__file__).resolve().parent / "demo.yaml"  # package data: the spec `make report` runs


def _code_flags(parser: argparse.ArgumentParser) -> None:
    """--allow-code and --allow-code-from, for the commands that load a spec's models (see zoo.check_code)."""
    parser.add_argument("--allow-code", action="store_true",
                        help="run the Python code the spec names (source: python factories): a file in the spec's "
                             "folder, or an installed module; refused without this flag")
    parser.add_argument("--allow-code-from", action="append", default=[], type=Path, metavar="DIR",
                        help="also run factory files under DIR, which may lie outside the spec's folder (repeatable; "
                             "implies --allow-code for those files)")


def _output_flags(parser: argparse.ArgumentParser, default) -> None:
    """-q/-v. Given before the command they set the default; after it (default SUPPRESS) they override it."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="print only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="also print a line per task and per image")


def _run_flags(parser: argparse.ArgumentParser) -> None:
    """The options of `run`, which `demo` shares."""
    parser.add_argument("--out", type=Path, help="run directory to write (default: output/<run_name>)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything instead of reusing cached results")
    _pdf_flag(parser)
    parser.add_argument("--cache-dir", type=Path, help="where cached results live (default: $REPORT_BUILDER_CACHE "
                                                    "or ~/.cache/report_builder)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: every task in this process (default); ray: the same tasks on Ray")
    parser.add_argument("--workers", metavar="N", default=None,
                        help="with --executor local: run independent tasks in N worker processes that share the "
                             "cores, or 'auto' (default, or $REPORT_BUILDER_WORKERS: on a CPU one per core, at most 4 "
                             "and one per 2 GiB free; 1 on a GPU); 1 runs every task in this process")
    parser.add_argument("--ray-address", metavar="ADDR",
                     help="with --executor ray: 'auto', host:port or ray://host:port for an existing cluster "
                          "(refused within about 10 s when nothing answers there); default: a local Ray "
                          "started for this run and stopped after it")
    _code_flags(parser)


def _pdf_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-pdf", action="store_true",
                        help="write report.html (and units.html) but not report.pdf, which takes most of the rendering "
                             "time; `render RUN_DIR` writes it later")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m report_builder",
        description="Explain what image classifiers learn: network dissection (CLIP-Dissect), Grad-CAM, "
                    "AblationCAM, ScoreCAM and LIME, their agreement, and a report in HTML and PDF.",
    )
    from report_builder import __version__

    p.add_argument("--version", action="version", version=f"report_builder {__version__}")
    _output_flags(p, default=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser

    def with_output_flags(*args, **kwargs):  # -q and -v after the command too: `run spec.yaml -q`
        parser = add_parser(*args, **kwargs)
        _output_flags(parser, default=argparse.SUPPRESS)
        return parser

    sub.add_parser = with_output_flags

    run = sub.add_parser("run", help="run a spec end to end and write its run directory and report",
                         description="Run a spec: load models and images, dissect the listed layers, explain "
                                     "predictions, measure agreement, and render report.html and report.pdf into "
                                     "the run directory.")
    run.add_argument("spec", type=Path, help="the YAML spec file")
    _run_flags(run)
    demo = sub.add_parser("demo", help="run the offline demo that ships with report_builder (no network needed)",
                          description="Run the packaged demo spec (two EfficientNet-Lite models on packaged photos; "
                                      "the spec `make report` runs from a clone) and write its report.")
    _run_flags(demo)

    val = sub.add_parser("validate", help="check a spec without running it",
                         description="Validate a spec file and everything a run checks before it starts: images "
                                     "decoded, models and their layers loaded, probe sets and concept files found. "
                                     "Every problem is listed with its key path.")
    val.add_argument("spec", type=Path, help="the YAML spec file")
    _code_flags(val)

    ren = sub.add_parser("render", help="re-render report.html and report.pdf from a run directory",
                         description="Re-render a run directory's report from its results.json; no model is loaded.")
    ren.add_argument("run_dir", type=Path, help="a run directory, e.g. output/demo")
    _pdf_flag(ren)

    chk = sub.add_parser("check", help="test a run's or a diff's numbers against thresholds (exit 3 if one fails)",
                         description="Evaluate checks (thresholds on the run's numbers: pointing_hit, deletion_auc, "
                                     "top1_agreement, ...) on an existing run or diff directory, without recomputing. "
                                     "The checks are the run's own (its spec's checks:), or those of --spec. Prints "
                                     "each failure and writes a JUnit XML file. Exit 0: all pass; 3: one or more "
                                     "failed; 2: a problem with the input.")
    chk.add_argument("run_dir", type=Path, help="a run directory (output/demo) or a diff directory")
    chk.add_argument("--spec", type=Path, help="a YAML file whose 'checks:' to evaluate (default: the run's own)")
    chk.add_argument("--junit", type=Path, help="where to write the JUnit XML (default: RUN_DIR/checks.xml)")

    dif = sub.add_parser("diff", help="compare two run directories (e.g. two versions of a model)",
                         description="Compare two runs: spec keys, weights, predictions, Grad-CAM maps, LIME agreement "
                                     "and unit labels. Reads only the run directories; no model is loaded.")
    dif.add_argument("run_a", type=Path, help="the first run directory (A)")
    dif.add_argument("run_b", type=Path, help="the second run directory (B)")
    dif.add_argument("--out", type=Path, help="where to write diff.json and the report (default: output/diff-A-vs-B)")
    dif.add_argument("--pair", action="append", default=[], metavar="A_ID=B_ID",
                     help="compare model A_ID of run A with model B_ID of run B (repeatable; default: models with the same id)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with signals_interrupt():
        try:
            return _main(args)
        except Exception:
            if pending_signal() is None:
                raise
            return _interrupted(pending_signal())  # the signal surfaced as another error: still an interruption


def _interrupted(signum: int | None) -> int:
    terminated = signum == signal.SIGTERM
    print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}; no output was written", file=sys.stderr)
    return 143 if terminated else 130


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "validate":
            import io

            from report_builder.pipeline.runner import Progress, pick_device, preflight
            from report_builder.spec.schema import load_spec

            loaded = load_spec(args.spec)
            s = loaded.spec
            inputs = preflight(loaded, pick_device(s.device), Progress(io.StringIO()), args.allow_code,
                               args.allow_code_from)
            print(f"{args.spec}: ok — {len(inputs.models)} model(s), {len(inputs.images)} image(s), "
                  f"methods {', '.join(s.explain.methods)}; output/{loaded.run_name}")
            return 0
        if args.command in ("run", "demo"):
            from report_builder.pipeline.cache import Cache
            from report_builder.pipeline.progress import Progress
            from report_builder.pipeline.runner import run
            from report_builder.spec.schema import load_spec

            workers = _workers(args.workers, args.executor)
            loaded = load_spec(DEMO_SPEC if args.command == "demo" else args.spec)
            out = args.out or Path("output") / loaded.run_name
            if args.ray_address and args.executor != "ray":
                raise UserError("--ray-address: given without --executor ray")
            if args.ray_address:  # before any model loads: an address with nothing behind it fails in seconds
                from report_builder.pipeline.tasks import check_ray_address

                check_ray_address(args.ray_address)
            run(loaded, out, cache=Cache(args.cache_dir, enabled=not args.no_cache),
                progress=Progress(quiet=args.quiet, verbose=args.verbose), executor=args.executor,
                ray_address=args.ray_address, allow_code=args.allow_code, allow_code_from=args.allow_code_from,
                workers=workers, pdf=not args.no_pdf)
            if loaded.spec.checks:
                from report_builder.report.checks import CHECKS_FAILED, run_outcome

                failed, text = run_outcome(out)
                print(text, file=sys.stderr if failed else sys.stdout)
                return CHECKS_FAILED if failed else 0
            return 0
        if args.command == "diff":
            from report_builder.report.diff import write_diff

            pairs = []
            for item in args.pair:
                if item.count("=") != 1 or not all(item.split("=")):
                    raise UserError(f"--pair: found {item!r}, expected A_ID=B_ID")
                pairs.append(tuple(item.split("=")))
            out = args.out or Path("output") / f"diff-{args.run_a.name}-vs-{args.run_b.name}"
            write_diff(args.run_a, args.run_b, out, pairs or None)
            print(f"wrote {out}/diff.json, {out}/report.html and {out}/report.pdf")
            return 0
        if args.command == "check":
            from report_builder.report.checks import check_dir
            from report_builder.spec.schema import load_checks

            given = load_checks(args.spec) if args.spec else None
            return check_dir(args.run_dir, given, str(args.spec), args.junit)
        if args.command == "render":
            from report_builder.report.render import render_run

            render_run(args.run_dir, pdf=not args.no_pdf)
            print(f"wrote {args.run_dir}/report.html" + ("" if args.no_pdf else f" and {args.run_dir}/report.pdf"))
            return 0
    except UserError as exc:
        if pending_signal() is not None:
            return _interrupted(pending_signal())
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine said no: a full or read-only disk, a permission
        if pending_signal() is not None:
            return _interrupted(pending_signal())
        from report_builder.files import os_error_text

        print(f"error: {os_error_text(exc, _places(args))}; any output of this command was left out", file=sys.stderr)
        return 2
    except (MemoryError, ImportError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        print(f"error: {_memory_text(exc)}; any output of this command was left out", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(getattr(exc, "signum", None))
    return 1


def _workers(given: str | None, executor: str) -> int | str:
    """--workers (else $REPORT_BUILDER_WORKERS, else auto): a whole number from 1, or 'auto'; only the local
    executor has workers."""
    where = "--workers"
    if given is None:
        given, where = os.environ.get("REPORT_BUILDER_WORKERS") or None, "REPORT_BUILDER_WORKERS"
        if given is None or executor != "local":
            return "auto"
    elif executor != "local":
        raise UserError(f"--workers: given with --executor {executor}, whose tasks run in its own workers; "
                        "leave --workers out")
    if given == "auto":
        return given
    if not given.isdigit() or int(given) < 1 or int(given) > 256:
        raise UserError(f"{where}: found {given!r}, expected a whole number from 1 to 256, or auto")
    return int(given)


def _places(args: argparse.Namespace) -> str:
    """The folders a command writes, to name in a message about the disk that has no filename of its own."""
    if args.command in ("run", "demo"):
        from report_builder.pipeline.cache import default_root

        out = args.out or "output/<run_name>"
        return f"the output folder {out} or the cache {args.cache_dir or default_root()}"
    if args.command == "diff":
        return f"the output folder {args.out or 'output/diff-A-vs-B'}"
    if args.command in ("render", "check"):
        return f"the run directory {args.run_dir}"
    return "the current folder"


_MEMORY_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "failed to map segment",
                 "not enough memory")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _MEMORY_WORDS)


def _memory_text(exc: BaseException) -> str:
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    cap = f"; this process may use at most {limit / 2**30:.1f} GiB of address space (ulimit -v)" \
        if limit != resource.RLIM_INFINITY else ""
    return (f"out of memory ({type(exc).__name__}: {str(exc)[:120]}){cap}. Give it more memory, or lower "
            "batch_size, the number of images or the probe set")


def cli() -> None:
    """The command's entry point (`python -m report_builder`, `report-builder`): main(), then exit without the
    interpreter's last garbage collection, which walks every object a run made (2.4-3.4 s after a demo run, measured)
    to free memory the exit frees anyway. Only the process's entry point may do this: in-process callers (tests, a
    notebook) keep their collector."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # finalisation collects only unfrozen objects; module teardown still runs, atexit handlers too
    sys.exit(code)


if __name__ == "__main__":
    cli()
