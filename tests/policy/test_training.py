"""Training on real components: a tiny tabletop RLDS dataset on disk, the quickstart config made small.

Exact resume after SIGKILL, 2-process gloo torchrun, gradient accumulation, the NaN/Inf guard, EMA,
fine-tuning's explicit tokenizer / action bounds, bad inputs before the first step, bench train."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT

CONFIG = ROOT / "configs" / "quickstart.yaml"
TINY = ["train.batch_size=4", "train.log_every=1", "train.save_every=0", "model.controller.layers=1",
        "train.warmup_steps=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    from datasets.collect import collect

    root = tmp_path_factory.mktemp("train-data")
    return str(collect("tabletop", ["reach", "lift"], 2, root / "data", workers=1, progress=False).path)


@pytest.fixture(scope="session")
def reach_data(tmp_path_factory) -> str:
    """A second tiny dataset whose episodes are shorter than tiny_data's longest (reach only)."""
    from datasets.collect import collect

    root = tmp_path_factory.mktemp("train-data-reach")
    return str(collect("tabletop", ["reach"], 2, root / "data", workers=1, progress=False).path)


def mixture(*paths: str) -> str:
    return "data.mixture=[" + ", ".join(f"{{path: '{p}'}}" for p in paths) + "]"


def cfg_of(*overrides: str):
    from policy.config import load_config

    return load_config(CONFIG, TINY + list(overrides))


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(Path(run_dir) / "checkpoints" / f"step-{step:08d}" / "train_state.pt", weights_only=True)
    return state["model"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# A real process that dies by SIGKILL right after its first checkpoint is on disk.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import policy.checkpoint as ckpt
    save = ckpt.save_checkpoint
    def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save_checkpoint = save_then_die
    import run_policy
    sys.exit(run_policy.main(sys.argv[1:]))
""")


def test_resume_after_sigkill_gives_identical_weights(tiny_data, tmp_path):
    from policy.train import train

    n, overrides = 6, ["train.ema_decay=0.5", "data.random_shift=2", "train.keep_checkpoints=2"]
    straight = train(cfg_of(f"train.steps={n}", *overrides), tiny_data, tmp_path / "straight", progress=False)

    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT)))
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), "train", "--config", str(CONFIG), "--data", tiny_data,
                           "--out", str(run), "--steps", str(n), *TINY, f"train.save_every={n // 2}", *overrides],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{n // 2:08d}"]

    proc = subprocess.run([sys.executable, str(ROOT / "run_policy.py"), "train", "--resume", str(run),
                           "--json", str(tmp_path / "resumed.json")], env=ENV, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "resumed.json").read_text())["resumed_from_step"] == n // 2
    assert_same(weights(tmp_path / "straight", n), weights(run, n))
    assert_same(load_file(str(Path(straight.policy_dir) / "model.safetensors")),
                load_file(str(run / "policy" / "model.safetensors")))  # the EMA weights too
    # keep_checkpoints=2: step 3 and step 6 remain; nothing half-written is left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{n // 2:08d}", f"step-{n:08d}"]


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    from policy.config import load_config
    from policy.train import Trainer
    from policy.distributed import shutdown
    cfg = load_config({config!r}, {overrides!r})
    trainer = Trainer(cfg, {data!r}, {out!r}, progress=False)
    res = trainer.run()
    rank = trainer.info.rank
    first = next(trainer.inputs.batches(0))
    torch.save({{"model": trainer.model.state_dict(), "world": trainer.info.world_size,
                "first_actions": first["action"]}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
    shutdown(trainer.info)
""")


# Global batch 8 = 2 ranks x 2 accumulated micro-batches x 2 (DDP's no_sync path included).
DDP_OVERRIDES = ["train.steps=3", "train.batch_size=8", "train.grad_accum=2", "train.num_threads=1"]


@pytest.fixture(scope="module")
def torchrun_run(tiny_data, tmp_path_factory) -> Path:
    """A 2-process gloo run started by torchrun (the multi-GPU launcher, here on CPU)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "ddp"
    out.mkdir()
    script = tmp / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), config=str(CONFIG), data=tiny_data, out=str(out),
                                        overrides=TINY + DDP_OVERRIDES))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_process_gloo_torchrun_ends_with_identical_weights(torchrun_run):
    out = torchrun_run
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert_same(r0["model"], r1["model"])
    assert not torch.equal(r0["first_actions"], r1["first_actions"])  # each rank reads its own shard
    assert (out / "policy" / "model.safetensors").is_file()


def test_train_processes_starts_the_group_torchrun_would(tiny_data, torchrun_run, tmp_path):
    from policy.train import train

    # train.processes=2 from one Python call: the same 2-rank training as torchrun's, weight for weight.
    res = train(cfg_of(*DDP_OVERRIDES, "train.processes=2"), tiny_data, tmp_path / "group", progress=False)
    assert res.world_size == 2 and res.steps == 3 and res.policy_dir == str(tmp_path / "group" / "policy")
    assert json.loads((tmp_path / "group" / "train_result.json").read_text())["world_size"] == 2
    assert_same(load_file(str(tmp_path / "group" / "policy" / "model.safetensors")),
                load_file(str(torchrun_run / "policy" / "model.safetensors")))


def test_train_processes_raises_the_members_own_error(tmp_path):
    from policy.config import ConfigError
    from policy.train import train

    # A member's failure comes back as its own exception (the CLI prints its message), nothing is left running.
    with pytest.raises(ValueError, match=r"expected an RLDS dataset directory|does not exist|no such") as one:
        train(cfg_of(), str(tmp_path / "missing"), tmp_path / "one", progress=False)
    with pytest.raises(type(one.value), match=re.escape(str(one.value))):
        train(cfg_of("train.processes=2"), str(tmp_path / "missing"), tmp_path / "two", progress=False)
    import multiprocessing

    assert not multiprocessing.active_children()
    # A Trainer made by hand is one process: the group is train()'s to start.
    from policy.train import Trainer

    with pytest.raises(ConfigError, match=r"train\.processes: expected the group of 2 processes that train\(\) starts"):
        Trainer(cfg_of("train.processes=2"), str(tmp_path / "missing"), tmp_path / "three", progress=False)


@pytest.mark.parametrize("keyframes", [[], ["data.sequence=window", "data.sequence_length=3",
                                              "model.controller.memory_horizon=3", "train.keyframe_weight=5",
                                              "train.keyframe_threshold=0.05"]], ids=["plain", "keyframe-weighted"])
def test_gradient_accumulation_equals_the_bigger_batch(tiny_data, tmp_path, keyframes):
    from policy.train import Trainer

    # A LayerNorm backbone: BatchNorm statistics would (rightly) differ between micro-batches and one batch.
    common = ["train.steps=2", "model.image.backbone=vit", "train.seed=3", *keyframes]
    states = []
    for accum in (1, 2):
        t = Trainer(cfg_of(*common, f"train.grad_accum={accum}"), tiny_data, tmp_path / f"a{accum}", progress=False)
        heaviest = 0.0
        for _ in range(2):
            t.train_step()
            heaviest = max(heaviest, float(t._last_batch.get("loss_weight", torch.ones(1)).max()))
        assert heaviest == (5.0 if keyframes else 1.0)  # the weighting is in play where it is on
        states.append(t.model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=2e-5, rtol=1e-4, msg=k)


def test_non_finite_loss_is_skipped_counted_then_stops(tiny_data, tmp_path, monkeypatch):
    from policy.train import Trainer, TrainingError

    t = Trainer(cfg_of("train.steps=6", "train.max_bad_steps=3"), tiny_data, tmp_path / "nan", progress=False)
    real = t._loss
    poison = {"on": False}

    def loss(batch):
        value, acc, n = real(batch)
        return (value * float("nan") if poison["on"] else value), acc, n

    monkeypatch.setattr(t, "_loss", loss)
    t.train_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    poison["on"] = True
    stats, _ = t.train_step()
    assert stats.skipped and t.opt.skipped_total == 1
    assert_same(before, t.model.state_dict())  # no update
    poison["on"] = False
    stats, _ = t.train_step()
    assert not stats.skipped and np.isfinite(stats.loss) and t.opt.bad_in_a_row == 0
    poison["on"] = True
    t.train_step()
    t.train_step()
    with pytest.raises(TrainingError, match=r"NaN/Inf for 3 steps in a row \(train.max_bad_steps = 3\); 4 steps skipped"):
        t.train_step()


def test_ema_weights_are_what_the_policy_saves(tiny_data, tmp_path):
    from policy.train import Trainer

    t = Trainer(cfg_of("train.steps=3", "train.ema_decay=0.9"), tiny_data, tmp_path / "ema", progress=False)
    res = t.run()
    saved = load_file(str(Path(res.policy_dir) / "model.safetensors"))
    raw = t.model.state_dict()
    assert_same(saved, {k: v for k, v in t.ema.shadow.items()})
    assert any(not torch.equal(saved[k], raw[k]) for k in saved if k.startswith("controller."))
    assert json.loads((Path(res.policy_dir) / "policy.json").read_text())["ema_decay"] == 0.9


def test_fine_tune_reuses_tokenizer_and_action_bounds_explicitly(tiny_data, tmp_path):
    from policy.config import ConfigError
    from policy.train import train

    src = train(cfg_of("train.steps=1", "data.action_bounds=spec", "data.action_low=[-2,-2,-2,-2,-2]",
                       "data.action_high=[2,2,2,2,2]"), tiny_data, tmp_path / "src", progress=False)
    ft = train(cfg_of("train.steps=1", f"train.init_from={src.policy_dir}", "train.init_tokenizer=true",
                      "train.init_action_bounds=true", "train.init_modules=[backbone,token_learner,image_pos,text]"),
               tiny_data, tmp_path / "ft", progress=False)
    s, f = Path(src.policy_dir), Path(ft.policy_dir)
    assert (s / "tokenizer.model").read_bytes() == (f / "tokenizer.model").read_bytes()
    tok = json.loads((f / "action_stats.json").read_text())["tokenizer"]
    assert tok["low"] == [-2.0] * 5 and tok == json.loads((s / "action_stats.json").read_text())["tokenizer"]
    with pytest.raises(ConfigError, match="train.init_tokenizer / train.init_action_bounds: expected train.init_from"):
        train(cfg_of("train.init_tokenizer=true"), tiny_data, tmp_path / "x", progress=False)


def test_corrupt_source_policy_and_run_json_are_refused_naming_the_file(tiny_data, tmp_path, capsys):
    """A truncated policy.json / action_stats.json under train.init_from, or run.json under --resume, is
    reported with the file and the setting it came from, not as a bare JSONDecodeError or KeyError."""
    import run_policy
    from policy.config import ConfigError
    from policy.policy_dir import PolicyDirError
    from policy.train import train

    run = tmp_path / "run"
    assert run_policy.main(["train", "--config", str(CONFIG), "--data", tiny_data, "--out", str(run),
                            "--steps", "1", *TINY]) == 0, capsys.readouterr().err[-2000:]
    for name, text, error in [
        ("policy.json", '{"format_version": 1, "inp', r"policy.json: expected the format version and input spec "
                                                       r"as a JSON object, could not read it \(truncated or corrupt\?\)"),
        ("policy.json", '{"input": {"camera_key": "image"}}', r"policy.json input.image_shape: expected \[H, W, 3\]"),
        ("action_stats.json", "[1, 2]", r"action_stats.json: expected the action tokenizer .* got a JSON list"),
        ("action_stats.json", '{"tokenizer": 3}', r"action_stats.json 'tokenizer': expected the source policy's "),
    ]:
        src = tmp_path / f"src-{name}-{len(text)}"
        shutil.copytree(run / "policy", src)
        (src / name).write_text(text)
        cfg = cfg_of("train.steps=1", f"train.init_from={src}", "train.init_action_bounds=true")
        with pytest.raises(ValueError, match=rf"train.init_from '{src}'.*{error}") as info:
            train(cfg, tiny_data, tmp_path / f"ft-{name}-{len(text)}", progress=False)
        assert isinstance(info.value, (PolicyDirError, ConfigError))

    for text, error in [('{"config": {"train"', r"run.json: expected the run's metadata as a JSON object, could "
                                                  r"not read it \(truncated or corrupt\?\): JSONDecodeError"),
                        ('{"data": "x"}', r"run.json: expected a JSON object with the run's config .* got config = NoneType")]:
        (run / "run.json").write_text(text)
        assert run_policy.main(["train", "--resume", str(run)]) == 2
        assert re.search(rf"--resume '{run}': {error}", capsys.readouterr().err)


@pytest.mark.parametrize("overrides, error", [
    (["data.camera=observation/wrist"], r"camera field 'steps/observation/wrist' .*is not in the dataset"),
    (["model.image.image_size=96"], r"model.image.image_size: expected <= the dataset's frame size \(64x64"),
    (["data.action_bounds=spec", "data.action_low=[0,0,0]", "data.action_high=[1,1,1]"],
     r"data.action_low: expected 5 values \(the dataset's action size\), got 3"),
    (["train.batch_size=6", "train.grad_accum=4"], r"train.batch_size: expected a multiple of train.grad_accum"),
])
def test_config_that_does_not_fit_the_dataset_fails_before_training(tiny_data, tmp_path, overrides, error):
    from policy.train import train

    with pytest.raises(ValueError, match=error):
        train(cfg_of("train.steps=1", *overrides), tiny_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tb").exists()  # no step was taken


def test_unwritable_or_full_output_fails_before_training(tiny_data, tmp_path, monkeypatch):
    from policy.train import train

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"--out '.*a-file/run': expected a writable directory"):
        train(cfg_of("train.steps=1"), tiny_data, blocker / "run", progress=False)

    import policy.train as tr

    monkeypatch.setattr(tr.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(OSError, match=r"expected at least \d+ MiB free, the disk has 1 MiB"):
        train(cfg_of("train.steps=1"), tiny_data, tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / "tb").exists()


def test_bench_train_reports_the_step_split(tiny_data):
    from rollout.bench.train import bench_train

    out = bench_train(str(CONFIG), tiny_data, 2, overrides=TINY, warmup=1)
    split = out["seconds_per_step"]
    assert out["samples_per_second"] > 0 and out["device"] == "cpu" and out["peak_memory"]["bytes"] > 0
    assert set(split) == {"total", "data_wait", "forward", "backward", "optimizer"}
    assert split["forward"] > 0 and split["backward"] > 0
    assert split["data_wait"] + split["forward"] + split["backward"] + split["optimizer"] <= split["total"] * 1.5
    # The arithmetic rate: 3x the counted forward FLOPs over the median step, beside a matmul's rate.
    assert out["flops_per_step"] > 0 and out["matmul_gflops_per_second"] > 0
    assert out["achieved_gflops_per_second"] == pytest.approx(out["flops_per_step"] / split["total"] / 1e9, rel=0.01)
    assert out["fraction_of_matmul_rate"] == pytest.approx(
        out["achieved_gflops_per_second"] / out["matmul_gflops_per_second"], abs=0.002)


def test_evaluation_in_the_loop_needs_an_evaluator_wired_in(tiny_data, tmp_path):
    from policy.train import train

    # The trainer imports no simulator: evaluation comes from the caller, and its absence is an error up front.
    from policy.config import ConfigError

    with pytest.raises(ConfigError, match="train.eval_every: expected 0 when no evaluator is wired in"):
        train(cfg_of("train.steps=2", "train.eval_every=2"), tiny_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_evaluation_in_the_loop_logs_success_and_writes_videos(tiny_data, tmp_path):
    from policy.train import train
    from rollout.evaluate import in_loop_evaluator

    res = train(cfg_of("train.steps=2", "train.eval_every=2", "train.eval_episodes=1"), tiny_data, tmp_path / "run",
                progress=False, evaluator=in_loop_evaluator)
    assert set(res.eval["per_task"]) == {"reach", "lift"} and 0.0 <= res.eval["mean_success"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "run" / "eval" / "step-00000002").iterdir()) == \
        ["lift_000.mp4", "reach_000.mp4"]


def test_instructions_longer_than_max_tokens_are_refused_not_cut(tiny_data, tmp_path):
    # Cutting them dropped the colour and shape words of 41% of reach instructions (docs/RESULTS.md).
    from policy.config import ConfigError
    from policy.train import train

    with pytest.raises(ConfigError, match=r"model.language.max_tokens: expected >= \d+ \(the longest instruction, "
                                          r"'.+', is \d+ tokens plus the end token\), got 3"):
        train(cfg_of("train.steps=1", "model.language.max_tokens=3"), tiny_data, tmp_path / "run", progress=False)


def test_cli_trains_on_a_data_mixture_without_data(tiny_data, reach_data, tmp_path, capsys):
    import run_policy

    run, out = tmp_path / "mix", tmp_path / "mix.json"
    rc = run_policy.main(["train", "--config", str(CONFIG), "--out", str(run), "--steps", "2", *TINY,
                          mixture(tiny_data, reach_data), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert json.loads(out.read_text())["steps"] == 2
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"] is None and [m["path"] for m in meta["config"]["data"]["mixture"]] == [tiny_data, reach_data]
    assert (run / "policy" / "model.safetensors").is_file()
    # --data and a mixture together, or neither: refused before anything runs
    rc = run_policy.main(["train", "--config", str(CONFIG), "--out", str(tmp_path / "both"), "--data", tiny_data,
                          *TINY, mixture(tiny_data, reach_data)])
    assert rc == 2 and "expected none with data.mixture" in capsys.readouterr().err
    rc = run_policy.main(["train", "--config", str(CONFIG), "--out", str(tmp_path / "none"), *TINY])
    assert rc == 2 and "--data: expected an RLDS dataset directory (or data.mixture in the config), got neither" in capsys.readouterr().err
    assert not (tmp_path / "both").exists() and not (tmp_path / "none").exists()


def test_every_dataset_of_a_mixture_must_fit_the_config(tiny_data, reach_data, tmp_path):
    from datasets.rlds_dataset import RLDSDataset
    from policy.config import ConfigError
    from policy.train import train

    short, long = (RLDSDataset(p).scan()["max_episode_length"] for p in (reach_data, tiny_data))
    assert short < long  # the first dataset's episodes fit, the second's do not
    episodes = ["data.sequence=episode", "model.controller.memory_horizon=0", f"data.sequence_length={short}"]
    with pytest.raises(ConfigError, match=rf"data.sequence_length: expected >= the longest episode \({long} steps, "
                                          rf"in '{tiny_data}'\)"):
        train(cfg_of("train.steps=1", *episodes, mixture(reach_data, tiny_data)), None, tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run" / "tb").exists()


def test_fresh_run_into_a_directory_holding_a_run_is_refused(tiny_data, tmp_path):
    from policy.train import train

    run = tmp_path / "run"
    train(cfg_of("train.steps=1"), tiny_data, run, progress=False)
    before = {p: p.read_bytes() for p in (run / "run.json", run / "policy" / "model.safetensors")}
    with pytest.raises(FileExistsError, match=rf"--out '{run}': expected a new or empty run directory, it holds a "
                                              rf"training run \(run.json, checkpoints\); continue it with --resume"):
        train(cfg_of("train.steps=2", "train.seed=1"), tiny_data, run, progress=False)
    assert {p: p.read_bytes() for p in before} == before  # the old run is untouched
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    (run / "run.json").unlink()  # checkpoints alone are a run too
    with pytest.raises(FileExistsError, match=r"it holds a training run \(checkpoints\)"):
        train(cfg_of("train.steps=1"), tiny_data, run, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(cfg_of("train.steps=1"), tiny_data, empty, progress=False).steps == 1  # an empty directory is fine


def test_resume_refuses_what_it_cannot_honour_and_records_the_new_step_count(tiny_data, reach_data, tmp_path,
                                                                            capsys):
    import run_policy

    run = tmp_path / "run"
    assert run_policy.main(["train", "--config", str(CONFIG), "--data", tiny_data, "--out", str(run),
                            "--steps", "2", *TINY]) == 0, capsys.readouterr().err[-2000:]
    meta = (run / "run.json").read_text()
    why_data = r"\(it changes the data stream, and resume skips the micro-batches the run consumed"
    why_opt = r"\(the optimizer and scheduler state restored from the checkpoint keep the run's value\)"
    for args, error in [
        (["train.lr=3e-4"], rf"train\.lr cannot change on resume {why_opt}: the run has 0\.001, got 0\.0003"),
        (["train.weight_decay=0.1"], rf"train\.weight_decay cannot change on resume {why_opt}"),
        (["train.batch_size=8"], rf"train\.batch_size cannot change on resume {why_data}"),
        (["train.grad_accum=2"], rf"train\.grad_accum cannot change on resume {why_data}"),
        (["train.seed=1"], rf"train\.seed cannot change on resume {why_data}"),
        (["train.processes=2"], rf"train\.processes cannot change on resume {why_data}"),
        (["data.shuffle_buffer=8"], rf"data\.shuffle_buffer cannot change on resume {why_data}"),
        (["--data", reach_data], rf"--data '{reach_data}': expected none or the run's dataset \('{tiny_data}'\)"),
        (["model.controller.layers=2"], r"model\.controller\.layers cannot change on resume \(the checkpoint's weights"),
        (["--config", str(CONFIG)], r"--config '.*': expected none with --resume"),
        (["--steps", "1"], rf"train\.steps: expected >= 2, the step --resume '{run}' continues from"),
    ]:
        assert run_policy.main(["train", "--resume", str(run), *args]) == 2, args
        err = capsys.readouterr().err
        assert re.search(error, err), (args, err[-1500:])
    assert (run / "run.json").read_text() == meta  # a refused resume leaves the run as it was

    # --steps 4 (and a checkpoint at step 3) on resume, killed after that checkpoint: a plain --resume
    # then continues to step 4, not to the 2 steps the run started with.
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), "train", "--resume", str(run), "--steps", "4",
                           "train.save_every=3"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["train"]["steps"] == 4 and config["train"]["save_every"] == 3
    assert run_policy.main(["train", "--resume", str(run), "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["steps"] == 4 and out["resumed_from_step"] == 3
    assert (run / "checkpoints" / "step-00000004").is_dir()


def test_fine_tune_with_the_default_modules_works_without_image_positions(tiny_data, tmp_path):
    # The rt1 configs have no image position embedding; the default train.init_modules lists image_pos.
    from policy.train import train

    src = train(cfg_of("train.steps=1", "model.image.position_embedding=false"), tiny_data, tmp_path / "src",
                progress=False)
    ft = train(cfg_of("train.steps=1", "model.image.position_embedding=false", f"train.init_from={src.policy_dir}"),
               tiny_data, tmp_path / "ft", progress=False)
    assert ft.steps == 1


def test_fine_tune_into_another_memory_mode_only_with_init_allow_missing(tiny_data, tmp_path, capsys):
    # A TL policy fine-tuned as TL-AddErase-ours: the erase/add gates do not exist in the source.
    from safetensors.torch import load_file

    from policy.config import ConfigError
    from policy.train import Trainer

    src = Trainer(cfg_of("train.steps=1"), tiny_data, tmp_path / "src", progress=False).run()
    mods = "train.init_modules=[backbone,token_learner,image_pos,controller,head]"
    new = ["model.controller.memory_mode=TL-AddErase-ours", f"train.init_from={src.policy_dir}", mods]
    with pytest.raises(ConfigError, match=r"has no tensor 'controller\.erase\.weight'"):
        Trainer(cfg_of("train.steps=1", *new), tiny_data, tmp_path / "strict", progress=False)
    t = Trainer(cfg_of("train.steps=1", *new, "train.init_allow_missing=true"), tiny_data, tmp_path / "ft",
                progress=False)
    out = capsys.readouterr().out
    assert "4 tensors not in" in out and "controller.erase.weight" in out and "controller.add.bias" in out
    source = load_file(str(Path(src.policy_dir) / "model.safetensors"))
    own = t.model.state_dict()
    for name in source:
        if name.split(".")[0] in ("backbone", "controller", "head"):
            assert torch.equal(own[name], source[name]), name
    assert t.model.controller.erase.bias.eq(-3.0).all()  # fresh, with its configured erase_bias


def test_keyframe_weights_mark_action_changes_and_weigh_the_loss():
    from policy.train import keyframe_weights, sequence_loss

    actions = torch.zeros(2, 5, 3)
    actions[0, 2:, 0] = 0.8  # a start at step 2
    actions[0, 4, 2] = 1.0  # a gripper toggle at step 4
    actions[1, 1, 1] = 0.2  # below the threshold
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    w = keyframe_weights(actions, mask, 4.0, 0.5)
    assert w.tolist() == [[1, 1, 4, 1, 4], [1, 1, 1, 0, 0]]
    logits = torch.randn(2, 5, 3, 7)
    targets = torch.randint(0, 7, (2, 5, 3))
    plain, acc = sequence_loss(logits, targets, mask)
    weighted, acc_w = sequence_loss(logits, targets, mask, weights=w)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(2, 5, 3)
    torch.testing.assert_close(weighted, (ce * w[..., None]).sum() / (w.sum() * 3))
    torch.testing.assert_close(plain, (ce * mask[..., None]).sum() / (mask.sum() * 3))
    assert torch.equal(acc, acc_w)  # accuracy stays over the valid steps, unweighted
    assert torch.equal(keyframe_weights(actions, mask, 1.0, 0.5), mask.float())


def test_keyframe_weighting_needs_sequences_and_a_weight_of_at_least_one():
    from policy.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.keyframe_weight: expected 1 \(off\) with data.sequence_length 1"):
        cfg_of("train.keyframe_weight=3")
    with pytest.raises(ConfigError, match=r"train.keyframe_weight: expected >= 1 \(1 = off\), got 0.5"):
        cfg_of("train.keyframe_weight=0.5")
    with pytest.raises(ConfigError, match=r"train.keyframe_threshold: expected > 0"):
        cfg_of("train.keyframe_threshold=0")
