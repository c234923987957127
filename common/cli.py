"""Command-line pieces shared by run_policy.py and the benchmarks (rollout/bench/): argparse types that
name the flag on a bad value (`argument --steps: expected an integer >= 1, got '0'`), and the one way a
subcommand takes a config: `--config` plus positional `key=value` overrides, with one default."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"


def _number(text: str, convert, ok, expected: str):
    """`convert(text)` if it parses and satisfies `ok`, else argparse's error naming what was expected."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number >= 0")


def step_list(text: str) -> tuple[int, ...]:
    """'1,10,100' -> (1, 10, 100): episode steps, each >= 1."""
    try:
        steps = tuple(int(x) for x in text.split(","))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {text!r}")
    return steps


def add_config_args(parser: argparse.ArgumentParser, help: str = "YAML config", overrides: bool = True) -> None:
    """`--config PATH` (unset = QUICKSTART_CONFIG; read it with `config_path`) and, unless a caller
    declares its own, positional `key=value` overrides (policy.config.load_config applies them)."""
    parser.add_argument("--config", default=None,
                        help=f"{help} (default {QUICKSTART_CONFIG.relative_to(REPO_ROOT)})")
    if overrides:
        parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                            help="config overrides, e.g. train.lr=3e-4 model.controller.memory_tokens=32")


def config_path(args: argparse.Namespace) -> Path:
    """The --config of `args`, or the quickstart config when none was given."""
    return Path(args.config) if getattr(args, "config", None) is not None else QUICKSTART_CONFIG
