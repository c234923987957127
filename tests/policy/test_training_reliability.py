"""Training never publishes a policy that returns NaN, keeps the last good checkpoint when it refuses,
and names the path when the disk fills up (real tabletop data, the quickstart config made small)."""
import errno
import hashlib

import pytest
import torch

from tests.helpers import ROOT

CONFIG = ROOT / "configs" / "quickstart.yaml"
TINY = ["train.batch_size=4", "train.log_every=1", "model.controller.layers=1", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from datasets.collect import collect

    root = tmp_path_factory.mktemp("reliability-data")
    return str(collect("tabletop", ["reach"], 2, root / "data", workers=1, progress=False).path)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_huge_learning_rate_exits_non_zero_and_publishes_nothing(data, tmp_path, capsys):
    import run_policy

    run = tmp_path / "run"
    rc = run_policy.main(["train", "--config", str(CONFIG), "--data", data, "--out", str(run), "--steps", "2",
                          *TINY, "train.save_every=1", "train.lr=1e30"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "step 1: refusing to save a policy whose actions are not finite" in err
    assert "no earlier checkpoint exists" in err and "lower train.lr" in err
    assert not (run / "policy").exists() and not (run / "checkpoints").exists()


def test_non_finite_weights_are_refused_and_the_last_good_checkpoint_is_kept(data, tmp_path):
    from policy.config import load_config
    from policy.runner import PolicyRunner
    from policy.train import Trainer
    from policy.train_step import TrainingError

    run = tmp_path / "run"
    trainer = Trainer(load_config(CONFIG, TINY + ["train.steps=4", "train.save_every=0"]), data, run, progress=False)
    trainer.train_step()
    trainer.save()
    good = sha(run / "policy" / "model.safetensors")
    trainer.train_step()
    with torch.no_grad():
        next(trainer.model.controller.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=r"step 2: refusing to save a policy with non-finite weights: \d+ "
                                            r"tensors contain NaN or inf \(controller\..*the last good checkpoint "
                                            r"'.*step-00000001' is kept"):
        trainer.save()
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000001"]
    assert sha(run / "policy" / "model.safetensors") == good  # RUN_DIR/policy is still the good one
    runner = PolicyRunner.load(run / "policy")
    runner.reset("reach the red block")
    spec = runner.spec
    obs = {spec.camera_key: torch.zeros(spec.image_shape, dtype=torch.uint8).numpy()}
    if spec.proprio_key:
        obs[spec.proprio_key] = torch.zeros(spec.proprio_dim).numpy()
    assert torch.isfinite(torch.as_tensor(runner.step(obs))).all()


def test_a_full_disk_names_the_checkpoint_being_written(data, tmp_path, monkeypatch, capsys):
    import policy.checkpoint as ckpt
    import run_policy

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    run = tmp_path / "run"
    rc = run_policy.main(["train", "--config", str(CONFIG), "--data", data, "--out", str(run), "--steps", "1", *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"disk full while writing '{run / 'checkpoints' / 'step-00000001'}'" in err and "MiB free there" in err
    assert not any((run / "checkpoints").iterdir())  # the staging directory is gone
