"""``rarl-fast`` command line. Only argparse at start-up: each subcommand imports what it needs when it runs.

:func:`main` is the error boundary: a failure the user can act on ends the command with one line
``rarl-fast: error: ...`` on stderr and its exit status (:mod:`rarl_fast.errors`); ``--debug`` adds the traceback.
``key.sub=value`` overrides may stand anywhere after the command, before or after its flags.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (configs/*.yaml); omitted = all defaults")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="overrides applied on top of the file (anywhere)"
    )


def _load(args: argparse.Namespace):
    from rarl_fast.config_loader import load_config

    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    """Validate a config and print it resolved (YAML)."""
    from rarl_fast.config_loader import dump_config

    cfg = _load(args)
    text = dump_config(cfg, args.out)
    if args.out is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.out}")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    """Build the embedded tiny random-weight Qwen2.5-VL (offline tokenizer and processor) into a folder."""
    from rarl_fast.model import make_tiny_vlm

    out = make_tiny_vlm(args.out, seed=args.seed)
    print(f"tiny VLM saved to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The README demo: tiny VLM, SFT warm start, then RARL (stage 1 + 2) against as many more SFT steps, with
    evaluations, the results table and the curves (see rarl_fast/demo.py)."""
    import os
    import subprocess

    from rarl_fast.demo import claim_demo_root, demo_processes, launch_command, launched, run_demo

    cfg = _load(args)
    claim_demo_root(cfg, overwrite=args.overwrite)  # before a relaunch: the processes then find the root free
    ablations = []
    if args.ablations:
        from rarl_fast.ablation import find_variants
        from rarl_fast.demo import DEMO_ABLATIONS

        ablations = find_variants(DEMO_ABLATIONS, config_path=args.config)
    processes = demo_processes(cfg) if args.processes is None else args.processes
    if processes > 1 and not launched():
        argv = ["demo", "--processes", "1", *(["--ablations"] if args.ablations else [])]
        argv += [*(["-c", args.config] if args.config else []), *args.overrides]
        argv += ["--debug"] if args.debug else []
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(cfg.cpu_threads or 1)}
        print(f"[demo] {processes} data-parallel CPU processes under accelerate launch", flush=True)
        return subprocess.call(launch_command(processes, argv), env=env)
    run_demo(cfg, ablations=ablations)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Run named ablation variants of the config (configs/ablations/<name>.yaml: the rows of the paper's Tables
    2-6), each into its own run folder under <output_dir>/<run_name>/, RL variants with the config's stage 1 from
    one shared stage-1 run; evaluate all on the same test groups and write the table. Running it again continues
    where it stopped. Runs under `accelerate launch` for several processes (see rarl_fast/ablation.py)."""
    import os
    from pathlib import Path

    from rarl_fast.ablation import find_variants, run_ablation

    cfg = _load(args)
    variants = find_variants(args.variants.split(","), config_path=args.config)
    root = Path(cfg.output_dir) / cfg.run_name
    run_ablation(cfg, variants, root)
    if int(os.environ.get("RANK", "0")) == 0:
        from rarl_fast.report import write_report

        print(write_report([root], paper=args.paper)["markdown"])
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The paper-shaped table of finished evaluations (ablate roots, demo or train/sft runs) side by side, with
    paired differences over the test groups; with --paper the paper's published rows beside ours. Writes
    report.md, report.csv, differences.csv and report.png (see rarl_fast/report.py)."""
    from rarl_fast.config import ConfigError
    from rarl_fast.report import write_report

    try:
        report = write_report(args.run_dirs, out=args.out, paper=args.paper, against=args.against)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"rarl-fast: error: {err}", file=sys.stderr)
        return 2
    print(report["markdown"])
    print(f"wrote {', '.join(str(p) for p in report['paths'].values())}")
    return 0


def _table(cells, name: str, cfg, out_dir) -> None:
    from rarl_fast.evaluate import task_name, write_table

    print(write_table({name: {task_name(cfg): cells}}, out_dir, cfg.data.group_sizes))


def _evaluate_trained(args: argparse.Namespace, cfg, model, tag: str, row: str) -> int:
    """Unless --no-eval: evaluate the model just saved at ``model`` and print its table row."""
    from rarl_fast.commands import run_eval, with_model

    if not args.no_eval:
        run_dir = model.parent
        _table(run_eval(with_model(cfg, model), tag, run_dir=run_dir), row, cfg, run_dir / "eval")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Two-stage RARL training (stage 1, then stage 2) of cfg.model; saves checkpoints and the final model, then
    evaluates it on the fixed test groups. Runs under `accelerate launch` for several processes."""
    from rarl_fast.commands import run_rarl

    cfg = _load(args)
    model = run_rarl(
        cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change
    )
    return _evaluate_trained(args, cfg, model, "rarl", "RARL")


def cmd_sft(args: argparse.Namespace) -> int:
    """Supervised fine-tuning on ground-truth answers (the SFT baseline); saves the model, then evaluates it."""
    from rarl_fast.commands import run_sft

    cfg = _load(args)
    return _evaluate_trained(args, cfg, run_sft(cfg, steps=args.steps, overwrite=args.overwrite), "sft", "SFT")


def cmd_eval(args: argparse.Namespace) -> int:
    """Greedy evaluation on the fixed test groups for each N: the paper-shaped table and every response."""
    from pathlib import Path

    from rarl_fast.commands import run_eval, with_model

    cfg = with_model(_load(args), args.model)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    name = args.name or Path(cfg.model.name_or_path).name
    _table(run_eval(cfg, name, run_dir=run_dir), name, cfg, run_dir / "eval")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Render a run's metrics.jsonl curves to PNG."""
    from rarl_fast.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Load the configured data and describe it: samples per split, skipped and repaired items by reason, value
    histograms, and a contact-sheet PNG of a few test groups with their prompts and true answers."""
    from pathlib import Path

    from rarl_fast.data import build_test_groups, load_task
    from rarl_fast.data.preview import contact_sheet, value_histogram

    cfg = _load(args)
    task = load_task(cfg.data, tolerance=cfg.tolerance())
    print(f"task: {task.task}   rule: {task.rule!r}   value range: {task.value_range!r}")
    print(f"tolerance: {task.tolerance:g}   1-image metric: {task.metric}")
    for text in task.report.lines():
        print(text)
    for split in ("train", "test"):
        print(f"value histogram ({split}):")
        for text in value_histogram([s.value for s in task.split(split)], task.value_min, task.value_max):
            print("  " + text)
    groups = build_test_groups(task, cfg.data.group_sizes, seed=cfg.data.seed, num_groups=args.per_n)
    for n, gs in groups.items():
        print(f"test groups of {n} image(s): {len(gs)} shown of data.num_test_groups={cfg.data.num_test_groups}")
    out = Path(args.out) if args.out else Path(cfg.output_dir) / cfg.run_name / "data_contact_sheet.png"
    shown = [g for gs in groups.values() for g in gs]
    contact_sheet(shown, out, title=task.report.source, max_pixels=cfg.data.max_image_pixels)
    print(f"wrote {out}")
    return 0


COMMANDS: dict[str, tuple[Handler, str]] = {
    "config": (cmd_config, "validate a config and print it resolved"),
    "make-tiny": (cmd_make_tiny, "build the tiny random-weight Qwen2.5-VL used by the demo and the tests"),
    "data": (cmd_data, "describe the configured data and write a contact sheet of example groups"),
    "train": (cmd_train, "two-stage RARL training (stage 1 regression, stage 2 full reward + RMO), then eval"),
    "sft": (cmd_sft, "supervised fine-tuning on ground-truth answers (baseline / warm start), then eval"),
    "eval": (cmd_eval, "greedy evaluation on the fixed test groups: results table + every response"),
    "plot": (cmd_plot, "render a run's training curves to PNG"),
    "demo": (cmd_demo, "the CPU demo: SFT warm start, then RARL vs continued SFT, table and curves"),
    "ablate": (cmd_ablate, "run named ablation variants (the paper's Tables 2-6) from shared starts, then eval"),
    "report": (cmd_report, "paper-shaped tables of finished runs side by side, optionally with the paper's rows"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rarl-fast",
        description="Ranking-aware RL (GRPO + RMO) for ordinal regression and ranking with Qwen2.5-VL.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    debug_help = "on an error, print the traceback as well as the one-line message"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=handler.__doc__)
        p.set_defaults(handler=handler)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if name in ("config", "demo", "data", "train", "sft", "eval", "ablate"):
            _add_config_args(p)
        if name in ("train", "sft"):
            p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
        if name in ("train", "sft", "demo"):
            p.add_argument(
                "--overwrite", action="store_true",
                help="start afresh in a run folder that holds an earlier run, after renaming that folder to "
                "<run_name>.replaced-<time> (nothing is deleted)",
            )  # fmt: skip
        if name == "train":
            p.add_argument(
                "--resume", action="store_true",
                help="continue the run in the run folder from its newest usable checkpoint, with the same config",
            )  # fmt: skip
            p.add_argument(
                "--allow-config-change", action="store_true",
                help="with --resume: accept a config that differs from the checkpoint's in keys that change training",
            )  # fmt: skip
        if name == "sft":
            p.add_argument("--steps", type=int, default=None, help="override sft.steps")
        if name == "eval":
            p.add_argument("--model", default=None, help="model folder or Hub id (default: cfg.model.name_or_path)")
            p.add_argument("--name", default=None, help="row name in the table")
        if name == "plot":
            p.add_argument("run_dir", help="run folder holding metrics.jsonl")
            p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
        if name == "config":
            p.add_argument("--out", default=None, help="write the resolved YAML here instead of stdout")
        if name == "data":
            p.add_argument("--out", default=None, help="contact-sheet PNG (default <output_dir>/<run_name>/...)")
            p.add_argument("--per-n", type=int, default=1, help="groups shown per N on the contact sheet")
        if name == "demo":
            p.add_argument(
                "--processes", type=int, default=None,
                help="data-parallel CPU processes (default: one per cpu_threads cores, started under accelerate "
                "launch; 1 runs in this process)",
            )  # fmt: skip
        if name == "demo":
            p.add_argument(
                "--ablations", action="store_true",
                help="also branch stage 2 without RMO and regression-only RARL from the same stage 1 (and evaluate "
                "stage 1 alone); about 5 more minutes on 2 idle cores",
            )  # fmt: skip
        if name == "ablate":
            p.add_argument(
                "--variants", required=True,
                help="comma-separated variant names (configs/ablations/<name>.yaml beside the config: base, sft, "
                "reg_only, rank_only, stage1_only, no_rmo, rarl) or paths to YAML overlays",
            )  # fmt: skip
        if name in ("ablate", "report"):
            p.add_argument("--paper", action="store_true", help="add the paper's published rows for our benchmarks")
        if name == "report":
            p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="ablate roots or run folders with eval/")
            p.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
            p.add_argument("--against", default="rarl", help="the row every other row is compared with (paired)")
        if name == "make-tiny":
            p.add_argument("out", help="output folder")
            p.add_argument("--seed", type=int, default=0, help="weight seed")
    return parser


def _leave_process_group() -> None:
    """Under `accelerate launch`, wait for every rank, then leave the process group before the interpreter exits:
    a rank that returns early (the demo's non-main ranks, while rank 0 writes the table and plots) and exits with
    the gloo group alive can abort ("terminate called without an active exception"). A command that never
    imported torch has no process group."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes ``key.sub=value`` overrides after the command's flags (argparse alone
    takes only the first run of positional words)."""
    args, extra = parser.parse_known_args(argv)
    stray = []
    for word in extra:
        if isinstance(getattr(args, "overrides", None), list) and _OVERRIDE.match(word):
            args.overrides.append(word)
        else:
            stray.append(word)
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume and --overwrite exclude each other: continue the run, or start afresh")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.version:
        from rarl_fast import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _show_warnings()
    try:
        code = args.handler(args)
    except (Exception, KeyboardInterrupt) as err:
        return _report(err, debug=args.debug)
    _leave_process_group()
    return code


def _show_warnings() -> None:
    """Warnings of rarl_fast's modules (a skipped image, an unusable checkpoint) on stderr as
    ``rarl-fast: warning: ...``, unless the application set up logging for them already."""
    import logging

    class Stderr(logging.StreamHandler):  # whatever sys.stderr is when a warning comes (tests swap it)
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    logger = logging.getLogger("rarl_fast")
    if logger.handlers:
        return
    handler = Stderr()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("rarl-fast: warning: %(message)s"))
    logger.addHandler(handler)


def _report(err: BaseException, *, debug: bool) -> int:
    """Print ``err`` as the one-line error (with the traceback first under ``--debug``); returns the exit status."""
    import traceback

    from rarl_fast.errors import describe, one_line

    if debug:
        traceback.print_exception(err)
    described = describe(err)
    if described is None:  # not a failure we know: a bug, or a library's error we do not translate yet
        code, message = 1, one_line(f"{type(err).__name__}: {err}")
        if not debug:
            message += " (an unexpected error: run with --debug for the traceback)"
    else:
        code, message = described
    print(f"rarl-fast: error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
