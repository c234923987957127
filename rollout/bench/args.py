"""Flags shared by several benchmarks, each declared (with its default) once, and argparse types.

argparse names the flag when a type function raises ArgumentTypeError: `argument --steps: expected
an integer >= 1, got '0'`.
"""
from __future__ import annotations

import argparse

from common.cli import (QUICKSTART_CONFIG, REPO_ROOT, add_config_args, config_path, non_negative_float,  # noqa: F401
                        positive_float, positive_int, step_list)

DEFAULT_THREADS = 2


def add_json(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: unset here, the `bench` parser's own --json (or its default) stands.
    p.add_argument("--json", default=argparse.SUPPRESS, metavar="PATH", help="write the results as JSON")


def add_threads(p: argparse.ArgumentParser, help: str = "torch threads") -> None:
    p.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, help=f"{help} (default {DEFAULT_THREADS})")


def add_config(p: argparse.ArgumentParser, help: str = "config for a freshly initialised policy") -> None:
    """--config alone (benches that take overrides add them with add_overrides)."""
    add_config_args(p, help, overrides=False)


def add_overrides(p: argparse.ArgumentParser) -> None:
    """Positional key=value config overrides, as `run_policy.py train` takes them."""
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.controller.type=rt1")


def add_steps(p: argparse.ArgumentParser, default: int, help: str = "timed steps") -> None:
    p.add_argument("--steps", type=positive_int, default=default, help=f"{help} (default {default})")


def add_image_size(p: argparse.ArgumentParser, default: int | None, help: str = "image size") -> None:
    p.add_argument("--image-size", type=int, default=default,
                   help=help if default is None else f"{help} (default {default})")


def add_seeds(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--seeds", type=positive_int, default=default,
                   help=f"expert episodes per task (seeds 0..N-1, default {default})")


def add_noise(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise", type=non_negative_float, default=0.0,
                   help="expert action noise (std of Gaussian noise on dx, dy, dz; action units)")


def add_policy(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--policy", default=None, help=help)
