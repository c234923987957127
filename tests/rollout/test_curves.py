"""Training-curve plots read the TensorBoard scalars that training writes (rollout/curves.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from rollout.curves import plot_curves, read_scalars
from tests.helpers import ROOT


def _log(run_dir, points: dict[str, list[tuple[int, float]]]) -> None:
    w = SummaryWriter(str(run_dir / "tb"))
    for tag, pts in points.items():
        for step, v in pts:
            w.add_scalar(tag, v, step)
    w.close()


def test_resumed_run_merges_event_files_and_later_values_win(tmp_path):
    run = tmp_path / "run"
    _log(run, {"train/loss": [(0, 5.0), (10, 4.0), (20, 3.5)]})
    # A resume after a kill at step 20 logs step 20 again, then goes on, into a second event file.
    _log(run, {"train/loss": [(20, 3.4), (30, 3.0)]})
    steps, values = read_scalars(run)["train/loss"]
    assert steps.tolist() == [0, 10, 20, 30]
    assert values.tolist() == pytest.approx([5.0, 4.0, 3.4, 3.0])


def test_plot_curves_cli_draws_every_run_and_summarises(tmp_path):
    a, b = tmp_path / "ttm", tmp_path / "rt1"
    _log(a, {"train/loss": [(s, 5.0 - s / 100) for s in range(0, 300, 25)],
             "train/token_accuracy": [(s, s / 400) for s in range(0, 300, 25)],
             "eval/success_rate": [(100, 0.2), (200, 0.6)]})
    _log(b, {"train/loss": [(s, 6.0 - s / 200) for s in range(0, 300, 25)],
             "train/token_accuracy": [(s, s / 800) for s in range(0, 300, 25)]})
    out, js = tmp_path / "fig" / "curves.png", tmp_path / "curves.json"
    proc = subprocess.run([sys.executable, str(ROOT / "run_policy.py"), "plot-curves", str(a), str(b),
                           "--labels", "TTM,RT-1", "--smooth", "2", "--out", str(out), "--json", str(js)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads(js.read_text())
    assert res["tags"] == ["train/loss", "train/token_accuracy", "eval/success_rate"]
    ttm = res["runs"]["TTM"]
    assert ttm["train/loss"]["points"] == 12 and ttm["train/loss"]["last_step"] == 275
    assert ttm["train/loss"]["last"] == pytest.approx(5.0 - (250 + 275) / 200)  # mean of the last 2 points
    assert ttm["eval/success_rate"]["last"] == pytest.approx(0.6)  # eval points are never smoothed
    assert "eval/success_rate" not in res["runs"]["RT-1"]


def test_bad_inputs_are_named(tmp_path):
    run = tmp_path / "run"
    _log(run, {"train/loss": [(0, 1.0)]})
    with pytest.raises(FileNotFoundError, match="TensorBoard event files"):
        plot_curves([tmp_path / "missing"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"tags: \['train/nope'\] were not logged"):
        plot_curves([run], tmp_path / "x.png", tags=["train/nope"])
    with pytest.raises(ValueError, match="labels: expected one per run"):
        plot_curves([run], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="expected a .png"):
        plot_curves([run], tmp_path / "x.jpg")
    with pytest.raises(ValueError, match=r"labels: expected one distinct label per run, got \['a'\]"):
        plot_curves([run, run], tmp_path / "x.png", labels=["a", "a"])


def test_runs_with_the_same_directory_name_keep_distinct_labels(tmp_path):
    a, b = tmp_path / "ttm" / "run", tmp_path / "rt1" / "run"
    _log(a, {"train/loss": [(0, 5.0), (10, 4.0)]})
    _log(b, {"train/loss": [(0, 6.0), (10, 5.5)]})
    res = plot_curves([a, b], tmp_path / "x.png")
    assert sorted(res["runs"]) == ["rt1/run", "ttm/run"]
    assert res["runs"]["ttm/run"]["train/loss"]["last"] == pytest.approx(4.0)
