"""``rarl-fast`` command line. Only argparse at start-up: each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (configs/*.yaml); omitted = all defaults")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides applied on top of the file")


def _load(args: argparse.Namespace):
    from rarl_fast.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    """Validate a config and print it resolved (YAML)."""
    from rarl_fast.config import dump_config

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
    """Train the demo on CPU (see README)."""
    from rarl_fast.demo import run_demo

    cfg = _load(args)
    run_demo(cfg)
    return 0


COMMANDS: dict[str, tuple[Handler, str]] = {
    "config": (cmd_config, "validate a config and print it resolved"),
    "make-tiny": (cmd_make_tiny, "build the tiny random-weight Qwen2.5-VL used by the demo and the tests"),
    "demo": (cmd_demo, "train the CPU demo (tiny VLM, supervised warm start on rendered prompts)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rarl-fast",
        description="Ranking-aware RL (GRPO + RMO) for ordinal regression and ranking with Qwen2.5-VL.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=handler.__doc__)
        p.set_defaults(handler=handler)
        if name in ("config", "demo"):
            _add_config_args(p)
        if name == "config":
            p.add_argument("--out", default=None, help="write the resolved YAML here instead of stdout")
        if name == "make-tiny":
            p.add_argument("out", help="output folder")
            p.add_argument("--seed", type=int, default=0, help="weight seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from rarl_fast import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from rarl_fast.config import ConfigError

    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"rarl-fast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
