"""The ``bayeslora`` command: methods, assets, run, leaderboard, report, profile, path, plan, params."""

from __future__ import annotations

import argparse
import logging
import sys

from bayeslora import BayesLoraError, ConfigError

FORMATS = ("md", "csv", "latex")


def _cmd_methods(args: argparse.Namespace) -> int:
    from bayeslora.registry import method_summaries

    methods = method_summaries()  # read from the sources: no method (nor pyro, vbll) is imported
    width = max(len(n) for n in methods)
    for name, (doc, module) in methods.items():
        print(f"{name:<{width}}  {doc}  [{module}]")
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from bayeslora.assets import ensure_all

    for what, path in ensure_all(verify=True).items():
        print(f"{what}: {path} (verified)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import Runner
    from .suite import apply_overrides, load_suite

    suite = load_suite(args.suite, args.set)
    from .executors import make_executor

    executor = make_executor(args.executor, args.out, apply_overrides({}, args.executor_option))
    executed = Runner(suite, args.out, rerun=args.rerun).run(executor)
    print(f"{len(executed)} runs executed, {len(suite.runs) - len(executed)} already finished; "
          f"results in {args.out}/results.csv")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .leaderboard import build_leaderboard

    out = Path(args.out or args.dirs[0])
    _, markdown = build_leaderboard(args.dirs, args.out, pool=args.pool)
    shown = {"md": markdown, "csv": (out / "leaderboard.csv").read_text(),
             "latex": (out / "leaderboard.tex").read_text()}[args.format]
    print(shown)
    print(f"written: {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'leaderboard.tex'}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    files = build_report(args.dirs, args.output, reference=args.reference, pool=args.pool)
    for note in files.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {files.html}")
    print(f"markdown: {files.markdown}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .leaderboard import format_seconds, phase_comparison, phase_table
    from .store import results_table
    from .tables import to_markdown

    tables = [results_table(d) for d in args.dirs]
    for d, df in zip(args.dirs, tables, strict=True):
        if df.empty or "time_train" not in df.columns:
            raise FileNotFoundError(f"no profiled runs under {d}/runs; run `bayeslora run SUITE --out {d}` first")
    if len(tables) == 1:
        print(to_markdown(format_seconds(phase_table(tables[0]))))
    elif len(tables) == 2:
        print(to_markdown(format_seconds(phase_comparison(tables[0], tables[1], tuple(args.dirs)))))
    else:
        raise ConfigError(f"bayeslora profile takes one results folder, or two to compare (before, after); "
                          f"got {len(tables)}")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bayeslora.config import build_dataclass
    from bayeslora.paths import PathSettings, barrier_table

    from .reload import reload_run
    from .runner import run_path_analysis
    from .store import record_file
    from .tables import to_markdown

    values = {"points": args.points, "splits": args.splits, "max_examples": args.max_examples,
              "batch_size": args.batch_size}
    settings = build_dataclass(PathSettings, {k: v for k, v in values.items() if v is not None}, "path")
    settings.check()
    run = reload_run(args.run_dir)
    table = run_path_analysis(run.posterior, run.backbone, run.task, settings)
    out = Path(args.run_dir) / "path.csv"
    table.to_csv(out, index=False)
    record_file(Path(args.run_dir), out.name)
    print(to_markdown(barrier_table(table).round(4)))
    print(f"written: {out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import Device, format_plan, plan_suite
    from .suite import load_suite

    suite = load_suite(args.suite, args.set)
    table = plan_suite(suite, Device.detect(args.gpu_memory))
    print(format_plan(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"written: {args.csv}", file=sys.stderr)
    too_big = int((~table["fits"]).sum())
    if too_big:
        print(f"{too_big} of {len(table)} rows will not fit on the device", file=sys.stderr)
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from bayeslora import get_method
    from bayeslora.meta import meta_backbone
    from bayeslora.registry import method_names

    from .suite import apply_overrides

    cls = get_method(args.method)
    counter = getattr(cls, "count_parameters", None)
    if counter is None:
        counting = []
        for name in method_names():
            try:
                if hasattr(get_method(name), "count_parameters"):
                    counting.append(name)
            except Exception:  # a plugin that fails to import counts nothing here; its own use names the error
                continue
        raise ConfigError(f"method {args.method!r} does not count its parameters without fitting; "
                          f"methods that do: {', '.join(counting)}")
    backbone = meta_backbone(args.model)
    counts = counter(backbone, apply_overrides({}, args.set), num_classes=args.num_classes)
    for what, n in counts.items():
        print(f"{what:<14} {n:>14,}")
    print(f"(K = {args.num_classes} answer classes: --num-classes)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayeslora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list registered posterior methods").set_defaults(func=_cmd_methods)
    sub.add_parser("assets", help="prepare the offline model and datasets").set_defaults(func=_cmd_assets)
    run = sub.add_parser("run", help="run a benchmark suite (resumes where it stopped)")
    run.add_argument("suite", help="suite YAML, e.g. configs/suites/smoke.yaml")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a suite value, e.g. --set data.max_test=32 (repeatable)")
    run.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                     help="where runs execute: here one after another (default), a Ray cluster, or Slurm (submitit)")
    run.add_argument("--executor-option", action="append", default=[], metavar="KEY=VALUE",
                     help="executor setting, e.g. address=auto, num_gpus=1, retries=2 (ray); cluster=local, "
                          "parameters.slurm_partition=gpu, parameters.gpus_per_node=1 (slurm)")
    run.add_argument("--rerun", action="append", default=[], metavar="METHOD|all",
                     help="execute a method's runs again although finished, recomputing its cached artifacts "
                          "(a method label or name, or all; repeatable)")
    run.set_defaults(func=_cmd_run)
    board = sub.add_parser("leaderboard", help="aggregate one or several results folders over seeds")
    board.add_argument("dirs", nargs="+", metavar="DIR",
                       help="output folder(s) of `bayeslora run`; several are merged, each row keeping its provenance")
    board.add_argument("--out", help="where to write leaderboard.{md,csv,tex} (default: the one DIR; required for "
                                     "several)")
    board.add_argument("--pool", action="store_true",
                       help="pool a method's runs over seeds even where the folders ran it under different protocols")
    board.add_argument("--format", choices=FORMATS, default="md",
                       help="what to print: md (default), csv, or latex (booktabs tables for a paper); "
                            "all three files are written either way")
    board.set_defaults(func=_cmd_leaderboard)
    report = sub.add_parser("report", help="one self-contained HTML comparison report (and a Markdown twin)")
    report.add_argument("dirs", nargs="+", metavar="DIR",
                        help="output folder(s) of `bayeslora run`; several are merged, each row keeping its provenance")
    report.add_argument("-o", "--output", help="HTML file to write (default DIR/report.html; required for several "
                                               "folders); the Markdown twin goes beside it as .md with its figures "
                                               "in <name>_files/")
    report.add_argument("--pool", action="store_true",
                        help="pool a method's runs over seeds even where the folders ran it under different protocols")
    report.add_argument("--reference", action="append",
                        help="method label the paired comparison is against; repeat for one section each "
                             "(default: every map entry of the folder, e.g. map and map-6ep)")
    report.set_defaults(func=_cmd_report)
    prof = sub.add_parser("profile", help="seconds per phase of a results folder, or two compared")
    prof.add_argument("dirs", nargs="+", help="one output folder, or two (before, after) for a speed-up table")
    prof.set_defaults(func=_cmd_profile)
    path = sub.add_parser("path", help="loss/accuracy along the linear path and the trained curve of a run")
    path.add_argument("run_dir", help="a finished run folder, OUT/runs/<run-id> (a method with paths, e.g. lora_curve)")
    path.add_argument("--points", type=int, help="values of t in [0, 1] (default 21)")
    path.add_argument("--splits", nargs="+", choices=["train", "val", "test"], help="default: train test")
    path.add_argument("--max-examples", type=int, help="first N examples of each split (default: all)")
    path.add_argument("--batch-size", type=int, help="evaluation batch size (default 16)")
    path.set_defaults(func=_cmd_path)
    plan = sub.add_parser("plan", help="parameters, memory and passes of every run of a suite, without weights")
    plan.add_argument("suite", help="suite YAML, e.g. configs/suites/commonsense-qwen2.5-7b.yaml")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a suite value")
    plan.add_argument("--gpu-memory", type=float, metavar="GB",
                      help="memory of one GPU (default: the visible GPU's, else 80)")
    plan.add_argument("--csv", help="also write the table as CSV")
    plan.set_defaults(func=_cmd_plan)
    params = sub.add_parser("params", help="a method's parameter counts on a model config, without loading weights")
    params.add_argument("method", help="a registered method, e.g. bayesian_lora")
    params.add_argument("--model", required=True,
                        help="a shipped config (Qwen/Qwen2.5-7B), a folder with config.json, a hub id or an alias")
    params.add_argument("--num-classes", type=int, default=4, metavar="K",
                        help="answer classes K, for a head over the K answer rows (default 4)")
    params.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the method's config, e.g. --set lora.target_modules=[q_proj,v_proj]")
    params.set_defaults(func=_cmd_params)
    return parser


def configure_logging(verbose: bool) -> logging.Handler:
    """The console shows warnings (INFO with -v); each run's log.txt gets INFO either way (see runner)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "bayeslora_console", False)]:
        root.removeHandler(old)
    console = logging.StreamHandler()
    console.bayeslora_console = True  # type: ignore[attr-defined]
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    root.setLevel(logging.INFO)
    return console


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = configure_logging(args.verbose)
    try:
        return args.func(args)
    except BayesLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger().removeHandler(console)


if __name__ == "__main__":
    sys.exit(main())
