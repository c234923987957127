"""Evaluation by rollouts: worker count does not change results; chart, memory figure, videos, JSON."""
import json

import numpy as np
import pytest

from common.seeds import EVAL_SEED_BASE
from rollout.evaluate import evaluate
from rollout.random_policy import build_random_policy

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("pol") / "policy", seed=3)


def _valid_png(path) -> tuple[int, ...]:
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and np.ptp(img) > 0
    return img.shape


def test_two_workers_give_the_same_episodes_as_one(policy_dir, tmp_path):
    import run_policy

    out = tmp_path / "eval.json"
    rc = run_policy.main(["eval", "--policy", str(policy_dir), "--tasks", "reach,push", "--episodes-per-task", "2",
                          "--workers", "2", "--chart", str(tmp_path / "chart.png"),
                          "--memory-figure", str(tmp_path / "memory.png"), "--video-dir", str(tmp_path / "videos"),
                          "--videos-per-task", "1", "--json", str(out)])
    assert rc == 0
    two = json.loads(out.read_text())
    one = evaluate(policy_dir, tasks=["reach", "push"], episodes_per_task=2, workers=1, progress=False)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "video"} for r in recs]  # noqa: E731
    assert strip(two["records"]) == strip(one.to_json()["records"])
    assert two["per_task"] == one.per_task
    assert len({r["action_digest"] for r in two["records"]}) == 4  # distinct episodes, not one replayed
    seeds = [r["seed"] for r in two["records"]]
    assert len(set(seeds)) == 4 and min(seeds) >= EVAL_SEED_BASE  # disjoint from demonstration seeds
    assert two["per_task"]["reach"]["episodes"] == 2 and two["per_task"]["reach"]["mean_length"] > 1
    assert sorted(p.split("/")[-1] for p in two["videos"]) == ["push_000.mp4", "reach_000.mp4"]
    for v in two["videos"]:
        with open(v, "rb") as f:
            assert f.read(12)[4:8] == b"ftyp"  # an mp4 container
    _valid_png(two["chart"])
    _valid_png(two["memory_figure"])


def test_eval_inputs_are_validated(policy_dir, tmp_path):
    with pytest.raises(ValueError, match="--workers: expected an integer >= 1, got 0"):
        evaluate(policy_dir, tasks=["reach"], episodes_per_task=1, workers=0)
    with pytest.raises(ValueError, match=r"--tasks: unknown task\(s\) \['fly'\]"):
        evaluate(policy_dir, tasks=["fly"], episodes_per_task=1)
    rt1 = build_random_policy(tmp_path / "rt1", overrides=["model.controller.type=rt1"])
    with pytest.raises(ValueError, match="--memory-figure: expected a TTM policy"):
        evaluate(rt1, tasks=["reach"], episodes_per_task=1, memory_figure=tmp_path / "m.png")
    from rollout.plots import success_chart

    with pytest.raises(ValueError, match="expected a .png file name"):
        success_chart({"reach": {"success_rate": 0.5, "episodes": 2}}, tmp_path / "chart.jpg")
    # Output paths are checked before any rollout, not after them.
    with pytest.raises(ValueError, match=r"--chart: expected a .png file name, got '.*chart.jpg'"):
        evaluate(policy_dir, tasks=["reach"], episodes_per_task=1000, chart=tmp_path / "chart.jpg")
    with pytest.raises(ValueError, match="--memory-figure: expected a .png file name"):
        evaluate(policy_dir, tasks=["reach"], episodes_per_task=1000, memory_figure=tmp_path / "m.pdf")


def test_cli_tasks_are_named_for_the_env_the_policy_was_trained_on(tmp_path, capsys):
    import shutil

    import run_policy

    mw = tmp_path / "mw"
    shutil.copytree(build_random_policy(tmp_path / "p", seed=4), mw)
    meta = json.loads((mw / "policy.json").read_text())
    meta["input"]["env"] = {"env": "metaworld-mt10", "camera": "corner2", "image_size": 64, "tasks": ["pick-place"]}
    (mw / "policy.json").write_text(json.dumps(meta))
    from policy.policy_dir import write_manifest

    write_manifest(mw)  # a deliberate edit: re-bless the checksums, as a user would
    # Without --env, --tasks is checked against the policy's env (Meta-World), not the tabletop suite:
    # the run gets past the task names and stops at the next check.
    rc = run_policy.main(["eval", "--policy", str(mw), "--tasks", "pick-place", "--episodes-per-task", "0"])
    err = capsys.readouterr().err
    assert rc != 0 and "--episodes-per-task: expected an integer >= 1" in err and "--tasks" not in err
    rc = run_policy.main(["eval", "--policy", str(mw), "--tasks", "lift", "--episodes-per-task", "1"])
    assert rc != 0 and "for env 'metaworld-mt10'" in capsys.readouterr().err


def test_each_evaluation_loads_the_weights_the_directory_holds_now(tmp_path):
    # Training's in-loop evaluation rewrites one policy directory; evaluate() must not reuse the weights
    # an earlier call in the same process loaded.
    import shutil

    d = tmp_path / "policy"
    build_random_policy(d, seed=1)
    first = evaluate(d, tasks=["reach"], episodes_per_task=1, progress=False).records[0].action_digest
    shutil.rmtree(d)
    build_random_policy(d, seed=2)
    second = evaluate(d, tasks=["reach"], episodes_per_task=1, progress=False).records[0].action_digest
    fresh = build_random_policy(tmp_path / "fresh", seed=2)
    assert second != first
    assert second == evaluate(fresh, tasks=["reach"], episodes_per_task=1, progress=False).records[0].action_digest


def test_records_say_how_each_episode_ended(policy_dir):
    from envs.tabletop import task_max_steps
    from envs.scene import COLORS, OBJECTS

    res = evaluate(policy_dir, tasks=["cue_touch", "reach", "stack"], episodes_per_task=3, workers=1, progress=False)
    for r in res.to_json()["records"]:
        assert r["outcome"] in ("success", "time limit", "policy terminated"), r
        assert (r["outcome"] == "success") == r["success"]
        if r["outcome"] == "time limit":
            assert r["length"] == task_max_steps(r["task"])
        if r["outcome"] == "policy terminated":
            assert r["length"] < task_max_steps(r["task"])
        assert r["details"]["target"] in OBJECTS
        if r["task"] == "cue_touch" and "first_touch" in r["details"]:
            assert r["details"]["first_touch"] in (*OBJECTS, "invalid")
        if r["task"] == "cue_touch":
            assert r["details"]["cue"] in COLORS  # the colour the lamp showed
        if r["task"] == "stack":  # the base object, which the instruction names too
            assert r["details"]["other"] in OBJECTS and r["details"]["other"] != r["details"]["target"]
        assert r["details"].get("first_grasped", OBJECTS[0]) in OBJECTS
        json.dumps(r)  # JSON-safe


def test_a_task_plays_the_same_episodes_whichever_tasks_are_evaluated_with_it(policy_dir):
    from common.seeds import eval_seed

    def push(tasks):
        res = evaluate(policy_dir, tasks=tasks, episodes_per_task=2, workers=1, progress=False)
        return [r for r in res.to_json()["records"] if r["task"] == "push"]

    alone = push(["push"])
    assert alone == push(["reach", "push"]) == push(["push", "reach"])
    # the seed blocks follow the policy's trained tasks (this one: every tabletop task, push third)
    assert [r["seed"] for r in alone] == [eval_seed(0, 2, 0), eval_seed(0, 2, 1)]


def test_seed_order_is_the_trained_tasks_then_the_envs_others():
    from rollout.evaluate import task_seed_order

    known = ["reach", "lift", "push", "stack"]
    assert task_seed_order(["stack", "reach"], known) == ["stack", "reach", "lift", "push"]
    assert task_seed_order([], known) == known
    assert task_seed_order(["elsewhere", "push"], known) == ["push", "reach", "lift", "stack"]  # foreign names skipped
    with pytest.raises(ValueError, match="env with 101 tasks: expected at most 100"):
        task_seed_order([], [f"t{i}" for i in range(101)])
