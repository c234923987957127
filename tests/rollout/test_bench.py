"""`run_policy.py bench NAME`: the registry behind it (one subparser per benchmark, its own flags only),
the one override syntax, the machine description, the expert-rollout timer shared by `bench env` and
`bench experts`, and the tabletop simulator-speed benchmarks. Benchmarks that need a fixture of
another suite (a dataset, a trained policy, Meta-World) are tested beside it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

os.environ.setdefault("MUJOCO_GL", "egl")

BENCHES = {"step", "step-latency", "env", "experts", "data", "train", "serve", "backbone", "model"}


def test_every_benchmark_registers_itself():
    from rollout.bench import bench_names, get_bench

    assert set(bench_names()) == BENCHES and len(bench_names()) == len(BENCHES)
    assert get_bench("experts").run.__module__ == "rollout.bench.experts"
    with pytest.raises(ValueError, match="bench: expected one of"):
        get_bench("juggle")


def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, run_policy; run_policy.build_parser(); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'mujoco', 'policy.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_bench_help_shows_only_that_benchmarks_flags():
    out = subprocess.run([sys.executable, str(ROOT / "run_policy.py"), "bench", "step", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--policy", "--config", "--steps", "--threads", "--json"):
        assert flag in out.stdout
    for flag in ("--clients", "--vit-size", "--seeds", "--controllers", "--batch-size", "--upstream"):
        assert flag not in out.stdout
    top = subprocess.run([sys.executable, str(ROOT / "run_policy.py"), "bench", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and all(name in top.stdout for name in BENCHES)


def test_config_overrides_are_positional_as_in_train(capsys):
    from run_policy import build_parser

    p = build_parser()
    a = p.parse_args(["bench", "model", "--steps", "2", "--threads", "1", "model.controller.memory_tokens=8"])
    assert a.what == "model" and a.overrides == ["model.controller.memory_tokens=8"] and a.steps == 2
    assert p.parse_args(["bench", "train", "train.lr=1e-4", "--steps", "3"]).overrides == ["train.lr=1e-4"]
    assert p.parse_args(["bench", "data", "--data", "D", "data.crop_pad=4"]).overrides == ["data.crop_pad=4"]
    assert p.parse_args(["bench", "step-latency", "model.image.image_size=32"]).overrides == [
        "model.image.image_size=32"]
    assert p.parse_args(["train", "--out", "R", "train.lr=1e-4"]).overrides == ["train.lr=1e-4"]
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "model", "--set", "model.controller.type=rt1"])
    assert "--set" in capsys.readouterr().err


def test_shared_flags_keep_their_defaults():
    from run_policy import build_parser

    p = build_parser()
    defaults = {name: p.parse_args(["bench", name] + (["--data", "D"] if name == "data" else [])) for name in BENCHES}
    assert {n: a.steps for n, a in defaults.items() if hasattr(a, "steps")} == {
        "step": 200, "backbone": 20, "model": 20, "train": 20, "serve": 100}
    assert {n: a.threads for n, a in defaults.items() if hasattr(a, "threads")} == {
        "step": 2, "backbone": 2, "model": 2, "step-latency": 2, "data": 2}
    assert {n: a.image_size for n, a in defaults.items() if hasattr(a, "image_size")} == {
        "env": 96, "backbone": 224, "data": 64, "serve": None}
    assert {n: a.seeds for n, a in defaults.items() if hasattr(a, "seeds")} == {"env": 10, "experts": 200}
    from common.cli import config_path

    # unset --config reads as the quickstart, the one default train and demo use too
    assert all(config_path(a) == ROOT / "configs" / "quickstart.yaml" and a.config is None
               for a in defaults.values() if hasattr(a, "config"))
    assert all(a.json is None for a in defaults.values())
    assert p.parse_args(["bench", "env", "--json", "x.json"]).json == "x.json"
    assert p.parse_args(["bench", "--json", "y.json", "env"]).json == "y.json"


def test_machine_description_merges_both_helpers():
    from rollout.bench.machine import machine

    m = machine()
    # the fields of rollout/bench.py's and rollout/bench_env.py's _machine(), plus the CPU model and versions
    assert {"cpu_count", "torch_threads", "load_average_1min", "platform", "torch", "date", "omp_num_threads",
            "mujoco_gl", "cpu_model", "python", "numpy"} <= set(m)
    json.dumps(m)


def test_expert_rollouts_time_episodes():
    import envs
    from rollout.bench.experts import expert_rollouts

    env = envs.make("tabletop", "reach", render=False)
    try:
        r = expert_rollouts(env, [0, 1])
    finally:
        env.close()
    assert r["expert_success"] == 1.0 and r["episodes"] == 2 and r["failed_seeds"] == []
    assert r["control_steps_per_s"] > 0 and r["control_steps_per_cpu_s"] > 0 and r["episode_steps_per_s"] > 0
    assert r["max_length"] >= r["mean_length"] > 0


def test_bench_env_tabletop_cli(tmp_path):
    from run_policy import main

    out = tmp_path / "env.json"
    assert main(["bench", "env", "--tasks", "reach", "--seeds", "2", "--frames", "2", "--image-size", "32",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["per_task"]["reach"]
    assert set(row) == {"expert_success", "successes", "episodes", "mean_length", "max_length",
                        "control_steps_per_s", "control_steps_per_cpu_s", "rendered_frames_per_s",
                        "rendered_frames_per_cpu_s", "camera"}
    assert row["expert_success"] == 1.0 and res["benchmark"] == "env" and res["image_size"] == 32


def test_bench_experts_cli(tmp_path, capsys):
    """Was envs/measure_experts.py's test (`python -m envs.measure_experts`)."""
    from run_policy import main

    path = tmp_path / "experts.json"
    assert main(["bench", "experts", "--seeds", "2", "--tasks", "reach", "lift", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert [t["task"] for t in result["tasks"]] == ["reach", "lift"]
    assert all(t["success_rate"] == 1.0 and t["episodes"] == 2 for t in result["tasks"])
    assert "reach" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "experts", "--tasks", "juggle"])


def test_benchmarks_report_rates():
    """Was in tests/test_tabletop_suite.py (envs.tabletop.benchmark_env / benchmark_render)."""
    from rollout.bench.env import benchmark_env, benchmark_render

    steps = benchmark_env("cue_touch", steps=10, render=False)
    assert steps["steps"] == 10 and steps["steps_per_s"] > 0 and steps["steps_per_cpu_s"] > 0
    frames = benchmark_render(image_size=24, frames=5, camera="wrist")
    assert frames["frames"] == 5 and frames["frames_per_s"] > 0 and frames["camera"] == "wrist"


def test_benchmark_env_reports_rate():
    """Was in tests/test_envs.py."""
    from rollout.bench.env import benchmark_env

    result = benchmark_env("push", steps=20, render=False, image_size=32)
    assert result["steps"] == 20 and result["steps_per_s"] > 0


def test_step_latency_plot_is_written_atomically(tmp_path):
    from rollout.bench.step_latency import _plot

    out = {"results": {"ttm": {"plot_points": {"1": {"median_ms": 1.0}, "10": {"median_ms": 1.5}}}},
           "samples_per_point": 2, "config": "configs/quickstart.yaml", "threads": 1}
    path = tmp_path / "plots" / "latency.png"
    assert _plot(out, path) == str(path)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in path.parent.iterdir()] == ["latency.png"]
