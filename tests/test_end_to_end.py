"""The whole path on real components: scripted episodes -> RLDS -> training -> policy directory ->
step runner -> rollouts, plus the command line's error handling."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT

CLI = [sys.executable, str(ROOT / "run_policy.py")]
TINY = ["train.steps=3", "train.batch_size=2", "train.log_every=1", "train.save_every=0",
        "model.controller.layers=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from datasets.collect import collect
    from policy.config import load_config
    from policy.train import train

    root = tmp_path_factory.mktemp("e2e")
    col = collect("tabletop", ["reach", "lift"], 2, root / "data", workers=1, progress=False)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", TINY)
    res = train(cfg, col.path, root / "run", progress=False)
    return root, col, res


def test_collect_train_eval_tiny(tiny_run):
    from rollout.evaluate import evaluate

    root, col, res = tiny_run
    assert col.episodes_written == 4 and col.transitions > 0
    assert res.steps == 3 and np.isfinite(res.final_loss)
    out = evaluate(res.policy_dir, "tabletop", ["reach"], 1, video_dir=root / "videos", progress=False)
    assert out.episodes == 1 and 0.0 <= out.mean_success <= 1.0
    assert out.per_task["reach"]["mean_length"] >= 1
    assert (root / "videos" / "reach_000.mp4").stat().st_size > 0
    assert set(out.to_json()) >= {"mean_success", "per_task", "episodes", "seconds"}
    assert (root / "run" / "tb").is_dir() and any((root / "run" / "tb").iterdir())


def test_policy_directory_is_self_contained_and_steps(tiny_run):
    from policy.policy_dir import FILES
    from policy.runner import ObservationError, PolicyRunner

    _, _, res = tiny_run
    names = {p.name for p in __import__("pathlib").Path(res.policy_dir).iterdir()}
    assert set(FILES) <= names and not any(n.endswith((".pt", ".pkl", ".pth")) for n in names)
    runner = PolicyRunner.load(res.policy_dir)
    runner.reset("touch the red block")
    obs = {"image": np.zeros((64, 64, 3), np.uint8), "state": np.zeros(4, np.float32)}
    a = runner.step(obs)
    assert a.shape == (5,) and a.dtype == np.float32 and np.all(np.isfinite(a))
    assert set(runner.named(a)) == set(runner.action_names)
    with pytest.raises(ObservationError, match=r"observation\['image'\]: expected uint8 \(64, 64, 3\), got uint8 \(32, 32, 3\)"):
        runner.step({"image": np.zeros((32, 32, 3), np.uint8), "state": np.zeros(4, np.float32)})
    with pytest.raises(ObservationError, match=r"observation\['image'\]: missing"):
        runner.step({"state": np.zeros(4, np.float32)})
    with pytest.raises(ObservationError, match=r"observation\['state'\]"):
        runner.step({"image": np.zeros((64, 64, 3), np.uint8), "state": np.full(4, np.nan, np.float32)})


def test_stepping_is_deterministic_after_reset(tiny_run):
    from policy.runner import PolicyRunner

    _, _, res = tiny_run
    runner = PolicyRunner.load(res.policy_dir)
    rng = np.random.default_rng(0)
    obs = [{"image": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "state": rng.normal(size=4).astype(np.float32)}
           for _ in range(5)]
    runs = []
    for _ in range(2):
        runner.reset("lift the blue cube")
        runs.append(np.stack([runner.step(o) for o in obs]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_incompatible_policy_directory_is_refused(tiny_run, tmp_path):
    import shutil

    from policy.policy_dir import PolicyDirError, load_policy_dir

    _, _, res = tiny_run
    bad = tmp_path / "policy"
    shutil.copytree(res.policy_dir, bad)
    meta = json.loads((bad / "policy.json").read_text())
    meta["format_version"] = 999
    (bad / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyDirError, match="format_version: expected 1, got 999"):
        load_policy_dir(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(PolicyDirError, match="missing model.safetensors"):
        load_policy_dir(bad)


def run_cli(*args, timeout=300):
    return subprocess.run(CLI + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sub", ["collect", "train", "eval", "demo", "bench", "serve", "inspect-data"])
def test_every_subcommand_has_help(sub):
    out = run_cli(sub, "--help")
    assert out.returncode == 0 and "--json" in out.stdout


def test_train_on_a_directory_that_is_not_rlds(tmp_path):
    (tmp_path / "notdata").mkdir()
    out = run_cli("train", "--data", str(tmp_path / "notdata"), "--out", str(tmp_path / "run"), "--steps", "1")
    assert out.returncode == 2
    assert "notdata" in out.stderr and "dataset_info.json" in out.stderr


def test_train_with_unknown_config_key(tiny_run, tmp_path):
    _, col, _ = tiny_run
    out = run_cli("train", "--data", col.path, "--out", str(tmp_path / "run"), "model.controller.memory_size=4")
    assert out.returncode == 2 and "memory_size" in out.stderr


def test_cli_collect_and_inspect(tmp_path):
    out = run_cli("collect", "--tasks", "reach", "--episodes-per-task", "1", "--out", str(tmp_path / "d"),
                  "--workers", "1", "--json", str(tmp_path / "c.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "c.json").read_text())["episodes_written"] == 1
    out = run_cli("inspect-data", str(tmp_path / "d"), "--json", str(tmp_path / "i.json"))
    assert out.returncode == 0, out.stderr
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["episodes"] == 1 and info["action_dim"] == 5 and len(info["instructions"]) == 1
    out = run_cli("collect", "--tasks", "fly", "--episodes-per-task", "1", "--out", str(tmp_path / "e"))
    assert out.returncode == 2 and "--tasks" in out.stderr and "fly" in out.stderr


def test_interrupted_collect_leaves_nothing_that_reads_as_a_dataset(tmp_path):
    import signal
    import time

    proc = subprocess.Popen(CLI + ["collect", "--tasks", "reach", "--episodes-per-task", "400", "--out",
                                   str(tmp_path / "d"), "--workers", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".d.partial") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    time.sleep(3)  # some episodes are in the staging directory now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert list(tmp_path.iterdir()) == []


def test_fine_tune_from_a_policy_directory_with_frozen_image_tokenizer(tiny_run, tmp_path):
    from safetensors.torch import load_file

    from policy.config import ConfigError, load_config
    from policy.train import train

    root, col, res = tiny_run
    src = load_file(str(Path(res.policy_dir) / "model.safetensors"))
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      TINY + ["train.steps=2", f"train.init_from={res.policy_dir}", "train.freeze_image_tokenizer=true",
                              "train.seed=5"])
    out = train(cfg, col.path, tmp_path / "ft", progress=False)
    new = load_file(str(Path(out.policy_dir) / "model.safetensors"))
    image = [k for k in src if k.split(".")[0] in ("backbone", "token_learner", "image_pos")]
    assert image and all(torch.equal(src[k], new[k]) for k in image)  # copied, then frozen (BN stats too)
    assert any(not torch.equal(src[k], new[k]) for k in src if k.startswith("controller."))  # trained on

    bad = load_config(ROOT / "configs" / "quickstart.yaml", TINY + [f"train.init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="train.init_from"):
        train(bad, col.path, tmp_path / "bad", progress=False)
    wrong = load_config(ROOT / "configs" / "quickstart.yaml",
                        TINY + [f"train.init_from={res.policy_dir}", "model.image.token_dim=64"])
    with pytest.raises(ConfigError, match=r"train.init_from: tensor '.*': expected shape"):
        train(wrong, col.path, tmp_path / "wrong", progress=False)


def test_demo_keep_continues_an_earlier_demo(tmp_path, capsys):
    """`demo --keep` reuses the dataset an earlier demo left (only if made with the same settings) and
    resumes its training run, so a killed or extended demo does not start again from nothing."""
    import run_policy

    out = tmp_path / "demo"
    base = ["demo", "--out", str(out), "--episodes-per-task", "1", "--eval-episodes", "1", "--workers", "1"]
    assert run_policy.main(base + ["--steps", "2"]) == 0, capsys.readouterr().err[-2000:]
    first = json.loads((out / "results.json").read_text())
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}

    assert run_policy.main(base + ["--steps", "3", "--keep"]) == 0, capsys.readouterr().err[-2000:]
    again = json.loads((out / "results.json").read_text())
    assert "reusing the 3 demonstrations" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir() if p.name in shards} == shards
    assert again["collect"]["episodes_written"] == 3
    assert again["collect"]["transitions"] == first["collect"]["transitions"]
    assert again["train"]["resumed_from_step"] == 2 and again["train"]["steps"] == 3

    # another dataset size in the same --out: refused, naming the setting, and nothing is changed
    assert run_policy.main(["demo", "--out", str(out), "--episodes-per-task", "2", "--keep", "--steps", "3"]) == 2
    assert "num_episodes = 3, this run asks for 6" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == again
