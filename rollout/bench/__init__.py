"""Benchmarks behind `python run_policy.py bench NAME`: one module per benchmark, one registry.

Each module registers itself at import with `register(name, help, add_arguments, run)`:
`add_arguments(parser)` declares that benchmark's own flags (shared ones through rollout/bench/args.py),
`run(args) -> dict` runs it from the parsed namespace, prints what it prints and returns the JSON
result (`run_policy.py` writes it to --json PATH). `add_subparsers(parser)` gives the `bench` parser
one subcommand per registered benchmark, so `bench NAME --help` lists only NAME's flags.

Modules import torch, TensorFlow, MuJoCo and the policy lazily, inside their functions: building the
command line's parser imports every bench module.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

# Registration order = the order of `bench --help`.
BENCH_MODULES = ("step", "step_latency", "env", "experts", "data", "train", "serve", "backbone", "model")


@dataclass(frozen=True)
class Bench:
    name: str  # the subcommand: `bench NAME`
    help: str  # one line for `bench --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    description: str | None = None  # `bench NAME --help` (default: help)


_REGISTRY: dict[str, Bench] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], dict], description: str | None = None) -> Bench:
    """Called once by each bench module at import; a second module claiming the same name is an error."""
    old = _REGISTRY.get(name)
    if old is not None and (old.add_arguments.__module__, old.run.__module__) != (add_arguments.__module__,
                                                                                run.__module__):
        raise ValueError(f"bench {name!r}: already registered by {old.run.__module__}")
    bench = Bench(name, help, add_arguments, run, description)
    _REGISTRY[name] = bench
    return bench


def _load() -> None:
    for module in BENCH_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def _ordered() -> list[Bench]:
    """Registered benchmarks in BENCH_MODULES order (then any registered from elsewhere)."""
    _load()
    rank = {f"{__name__}.{m}": i for i, m in enumerate(BENCH_MODULES)}
    return sorted(_REGISTRY.values(), key=lambda b: rank.get(b.run.__module__, len(rank)))


def bench_names() -> list[str]:
    return [b.name for b in _ordered()]


def get_bench(name: str) -> Bench:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"bench: expected one of {list(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def add_subparsers(parser: argparse.ArgumentParser, dest: str = "what") -> argparse._SubParsersAction:
    """One subparser per registered benchmark; each sets `bench_run` to its run function."""
    benches = _ordered()
    sub = parser.add_subparsers(dest=dest, required=True, metavar="{" + ",".join(b.name for b in benches) + "}")
    for bench in benches:
        sp = sub.add_parser(bench.name, help=bench.help, description=bench.description or bench.help)
        bench.add_arguments(sp)
        sp.set_defaults(bench_run=bench.run)
    return sub


__all__ = ["BENCH_MODULES", "Bench", "add_subparsers", "bench_names", "get_bench", "register"]
