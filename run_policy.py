#!/usr/bin/env python3
"""The command line: demo | collect | train | eval | bench | serve | inspect-data | plot-curves.

Every subcommand that produces numbers writes them as JSON with --json PATH (schemas in README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# OpenMP threads sleep rather than spin while they wait (policy/threads.py: on busy cores spinning made a
# 2-thread step 3-4x slower). Read once, when torch loads, so it is set before any import of torch. An
# empty value means "leave the OpenMP default" (bench step --load measures both).
if os.environ.get("OMP_WAIT_POLICY") == "":
    del os.environ["OMP_WAIT_POLICY"]
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from common.cli import add_config_args, config_path, positive_float, positive_int  # noqa: E402

DEMO_TASKS = ["reach", "lift", "push"]


def write_json(path: str | None, data: dict) -> None:
    if path:
        from common.atomic import write_json_atomic

        write_json_atomic(path, data)


def cmd_collect(a: argparse.Namespace) -> dict:
    import envs
    from datasets.collect import collect

    res = collect(a.env, envs.parse_tasks(a.env, a.tasks), a.episodes_per_task, a.out, seed=a.seed,
                  image_size=a.image_size, camera=a.camera, workers=a.workers, noise=a.noise,
                  keep_failures=a.keep_failures, image_encoding=a.image_encoding,
                  episodes_per_shard=a.episodes_per_shard, overwrite=a.overwrite, goals=a.goals)
    print(f"wrote {res.episodes_written} episodes ({res.transitions} steps) to {res.path} in {res.seconds:.0f}s"
          + (f"; {res.episodes_failed} failed expert episodes" + (" kept" if a.keep_failures else " dropped")
             if res.episodes_failed else ""))
    return res.to_json()


def cmd_train(a: argparse.Namespace) -> dict:
    from policy.config import load_config
    from policy.train import train
    from rollout.evaluate import in_loop_evaluator

    overrides = list(a.overrides)
    if a.steps is not None:
        overrides.append(f"train.steps={a.steps}")
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        a.json = None
    if a.resume:
        from policy.checkpoint import read_run_meta
        from policy.config import config_from_dict

        if a.config is not None:  # it would be ignored: the run's own config is used
            raise ValueError(f"--config {a.config!r}: expected none with --resume (the run's config from run.json "
                             "is used; pass key=value overrides instead)")
        if a.out and Path(a.out).resolve() != Path(a.resume).resolve():
            raise ValueError(f"--out {a.out!r}: expected nothing or the --resume directory {a.resume!r}")
        # The run's own config; overrides apply on top, and train refuses those a resume cannot honour.
        cfg = config_from_dict(read_run_meta(a.resume)["config"], overrides)
        res = train(cfg, a.data, a.resume, resume=True, evaluator=in_loop_evaluator)
    else:
        if not a.out:
            raise ValueError("train: expected --out RUN_DIR (or --resume RUN_DIR)")
        # a data.mixture in the config replaces --data (train checks that exactly one is given)
        cfg = load_config(config_path(a), overrides)
        res = train(cfg, a.data, a.out, evaluator=in_loop_evaluator)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {res.steps} steps in {res.seconds:.0f}s: loss {res.final_loss:.3f}, token accuracy "
              f"{res.final_token_accuracy:.3f}, {res.skipped_steps} skipped; policy at {res.policy_dir}")
    return res.to_json()


def cmd_eval(a: argparse.Namespace) -> dict:
    from rollout.evaluate import evaluate

    tasks = None
    if a.tasks:  # named for the env the policy will run in: --env, else the one it was trained on
        import envs
        from policy.policy_dir import load_policy_dir

        env = a.env or load_policy_dir(a.policy).spec.env.get("env", "tabletop")
        tasks = envs.parse_tasks(env, a.tasks)
    res = evaluate(a.policy, a.env, tasks, a.episodes_per_task, seed=a.seed, video_dir=a.video_dir,
                   videos_per_task=a.videos_per_task, workers=a.workers, chart=a.chart,
                   memory_figure=a.memory_figure)
    print(res.table())
    return res.to_json()


def cmd_demo(a: argparse.Namespace) -> dict:
    from datasets.collect import collect, reuse_dataset
    from policy.checkpoint import RUN_FILE
    from policy.config import load_config
    from policy.train import train
    from rollout.evaluate import evaluate, in_loop_evaluator

    out = Path(a.out)
    if out.exists() and not a.keep:
        import shutil
        shutil.rmtree(out)
    overrides = list(a.overrides) + ([f"train.steps={a.steps}"] if a.steps else [])
    cores = os.cpu_count() or 1
    if not any(o.startswith(("train.processes=", "train.num_threads=")) for o in overrides) and cores >= 2:
        # Nothing else runs during the training stage: use every core, as two data-parallel processes (2 x 1
        # thread trained the demo 1.56x faster than 2 threads in one process, same loss and success;
        # docs/RESULTS.md 4b). Two whatever the core count: each normalises its BatchNorm over 32 frames,
        # so the demo trains the same policy on any machine with 2 or more cores; the group shares the
        # cores out between its processes.
        overrides.append("train.processes=2")
    cfg = load_config(config_path(a), overrides)
    timings = {}
    t = time.perf_counter()
    # --keep: continue an earlier (possibly killed) demo: its dataset is reused, its training resumed
    col = reuse_dataset(out / "data", "tabletop", DEMO_TASKS, a.episodes_per_task, 0, a.noise) if a.keep else None
    if col is not None:
        print(f"[1/3] reusing the {col.episodes_written} demonstrations in {col.path}")
    else:
        print(f"[1/3] collecting {a.episodes_per_task} scripted demonstrations per task for {DEMO_TASKS}")
        col = collect("tabletop", DEMO_TASKS, a.episodes_per_task, out / "data", seed=0, workers=a.workers,
                      noise=a.noise)
    timings["collect_s"] = time.perf_counter() - t
    t = time.perf_counter()
    resume = a.keep and (out / "run" / RUN_FILE).is_file()
    print(f"[2/3] {'resuming' if resume else 'training'} the quickstart TTM policy for {cfg.train.steps} steps "
          f"on {col.transitions} transitions")
    tr = train(cfg, col.path, out / "run", resume=resume, evaluator=in_loop_evaluator)
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[3/3] evaluating {a.eval_episodes} episodes per task (unseen seeds)")
    ev = evaluate(tr.policy_dir, "tabletop", DEMO_TASKS, a.eval_episodes, video_dir=out / "videos")
    timings["eval_s"] = time.perf_counter() - t
    print(ev.table())
    print(f"videos: {out / 'videos'}   policy: {tr.policy_dir}   tensorboard --logdir {out / 'run' / 'tb'}")
    result = {"collect": col.to_json(), "train": tr.to_json(), "eval": ev.to_json(),
              "mean_success": ev.to_json()["mean_success"],
              "timings": {k: round(v, 1) for k, v in timings.items()}}
    write_json(str(out / "results.json"), result)
    return result


def cmd_bench(a: argparse.Namespace) -> dict:
    # `bench NAME`: the benchmark registered under NAME in rollout/bench/ (its flags, its run function)
    return a.bench_run(a)


def cmd_serve(a: argparse.Namespace) -> dict:
    from rollout.server import ServerConfig, serve_forever

    token = a.token or os.environ.get("POLICY_SERVER_TOKEN") or None
    cfg = ServerConfig(host=a.host, port=a.port, token=token, max_message_bytes=a.max_message_bytes,
                       rate_hz=a.rate_limit, burst=a.burst, max_sessions=a.max_sessions, model_thread=a.model_thread,
                       max_batch=a.max_batch, hello_timeout_s=a.hello_timeout, max_pending=a.max_pending,
                       max_pending_per_address=a.max_pending_per_address,
                       max_sessions_per_address=a.max_sessions_per_address,
                       auth_backoff_after=a.auth_backoff_after, auth_backoff_s=a.auth_backoff,
                       auth_backoff_max_s=a.auth_backoff_max)
    serve_forever(a.policy, cfg, threads=a.threads, device=a.device)
    return {"served": a.policy}


def cmd_plot_curves(a: argparse.Namespace) -> dict:
    from rollout.curves import plot_curves

    res = plot_curves(a.runs, a.out, labels=a.labels.split(",") if a.labels else None,
                      tags=a.tags.split(",") if a.tags else None, smooth=a.smooth, title=a.title)
    for label, tags in res["runs"].items():
        print(label + ": " + ", ".join(f"{t} {v['first']:.3g} -> {v['last']:.3g} (step {v['last_step']})"
                                       for t, v in tags.items()))
    print(f"wrote {res['figure']}")
    return res


def cmd_inspect(a: argparse.Namespace) -> dict:
    from datasets.rlds_dataset import RLDSDataset

    ds = RLDSDataset(a.data, split=a.split, standardization=a.standardization, camera=a.camera)
    scan = ds.scan()
    e = ds.entry
    out = {"path": ds.dir, "name": ds.name, "standardization": e.name,
           "splits": {k: int(v.num_examples) for k, v in ds.builder.info.splits.items()},
           "shards": int(ds.builder.info.splits[a.split].num_shards), "episodes": scan["num_episodes"],
           "steps": scan["num_transitions"], "max_episode_length": scan["max_episode_length"],
           "mean_episode_length": round(scan["mean_episode_length"], 2),
           "camera": ds.camera, "cameras": list(e.cameras), "image_shape": list(ds.image_shape),
           "image_encoding": ds.image_encoding, "proprio": e.proprio, "proprio_dim": ds.proprio_dim,
           "instruction_embedding_dim": ds.embedding_dim, "action_dim": ds.action_dim,
           "action_names": ds.action_names, "instructions": scan["instructions"],
           "action_stats": scan["action_stats"], "sidecar": ds.sidecar}
    print(ds.builder.info.features)
    print(f"dataset      {ds.dir} (TFDS name {ds.name!r}, standardization {e.name!r})")
    print(f"splits       " + ", ".join(f"{k}={v}" for k, v in out["splits"].items()) + f"; {a.split}: {out['shards']} shard(s)")
    print(f"episodes     {out['episodes']}, steps {out['steps']} (length mean {out['mean_episode_length']}, "
          f"max {out['max_episode_length']})")
    print(f"camera       {ds.camera} {list(ds.image_shape)} {ds.image_encoding} (cameras: {', '.join(e.cameras)})")
    print(f"proprio      {e.proprio if ds.proprio_dim else '-'} ({ds.proprio_dim}); "
          f"instruction embedding: {ds.embedding_dim or '-'}")
    print(f"instructions {len(scan['instructions'])}:")
    for text in scan["instructions"][:20]:
        print(f"  {text}")
    if len(scan["instructions"]) > 20:
        print(f"  ... {len(scan['instructions']) - 20} more (all in --json)")
    st = scan["action_stats"]
    cols = ["mean", "std", "min", "max", "p01", "p99"]
    print(f"{'action':<28}" + "".join(f"{c:>10}" for c in cols))
    for j, name in enumerate(ds.action_names):
        print(f"{name:<28}" + "".join(f"{st[c][j]:>10.4f}" for c in cols))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_policy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="run scripted experts and write an RLDS dataset")
    c.add_argument("--env", default="tabletop")
    c.add_argument("--tasks", default="all", help="'all' or a comma-separated list of tasks")
    c.add_argument("--episodes-per-task", type=int, required=True)
    c.add_argument("--out", required=True, help="new dataset directory (written atomically)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--image-size", type=int, default=64)
    c.add_argument("--camera", default=None, help="camera (default: the env's, tabletop front, Meta-World corner2)")
    c.add_argument("--workers", type=int, default=2, help="worker processes running the simulator")
    c.add_argument("--noise", type=float, default=0.0, help="expert action noise for diverse demonstrations")
    c.add_argument("--goals", default=None, choices=["benchmark", "random"],
                   help="Meta-World: the 50 benchmark goals per task (default; more episodes repeat them) or a "
                        "fresh random goal per episode")
    c.add_argument("--keep-failures", action="store_true", help="also write failed expert episodes (marked success=False)")
    c.add_argument("--image-encoding", default="png", choices=["png", "jpeg"])
    c.add_argument("--episodes-per-shard", type=int, default=100, help="episodes per TFRecord shard")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at --out (swapped in only once the new one is complete)")
    c.set_defaults(fn=cmd_collect)

    t = sub.add_parser("train", help="behaviour cloning from an RLDS dataset into a policy directory")
    add_config_args(t, "YAML config; none with --resume")
    t.add_argument("--data", default=None, help="RLDS dataset directory (with --resume: default the run's; "
                                                "none with data.mixture)")
    t.add_argument("--out", default=None, help="run directory; the policy goes to OUT/policy")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest checkpoint, exactly (its config; overrides on top: "
                        "train.steps and run-control keys only, docs/TRAINING.md)")
    t.add_argument("--steps", type=int, default=None, help="shortcut for train.steps=N")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="roll out a policy directory in simulation")
    e.add_argument("--policy", required=True)
    e.add_argument("--env", default=None, help="default: the env the policy was trained on")
    e.add_argument("--tasks", default=None, help="default: the tasks the policy was trained on")
    e.add_argument("--workers", type=int, default=1, help="worker processes (spawned; one runner and 1 torch thread each)")
    e.add_argument("--chart", default=None, metavar="PNG", help="write a bar chart of success per task")
    e.add_argument("--memory-figure", default=None, metavar="PNG",
                   help="TTM policies: write the memory's read and write weights over the first episode")
    e.add_argument("--episodes-per-task", type=int, default=20)
    e.add_argument("--seed", type=int, default=0, help="evaluation seed block (always disjoint from demonstrations)")
    e.add_argument("--video-dir", default=None)
    e.add_argument("--videos-per-task", type=int, default=1, help="videos written per task (with --video-dir)")
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="offline CPU demo: collect -> train -> eval on the tabletop suite")
    d.add_argument("--out", default="demo_out")
    add_config_args(d)
    # 1000: on the arm suite, 400 demonstrations per task gave 42% on unseen layouts, 1000 gave 73%
    # (README "Measured"); the policy fits its training layouts either way.
    d.add_argument("--episodes-per-task", type=int, default=1000)
    d.add_argument("--noise", type=float, default=0.2,
                   help="expert action noise while collecting (DART: the clean action is recorded)")
    d.add_argument("--eval-episodes", type=int, default=20)
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--keep", action="store_true",
                   help="continue the demo already in --out instead of clearing it: reuse its dataset (made "
                        "with the same settings), resume its training run, evaluate again")
    d.set_defaults(fn=cmd_demo)

    from rollout.bench import add_subparsers as add_bench_subparsers, bench_names

    b = sub.add_parser("bench", help="measure: " + ", ".join(bench_names()) + " (`bench NAME --help`: its flags)")
    add_bench_subparsers(b)
    b.set_defaults(fn=cmd_bench)

    from rollout.server import ServerConfig  # its defaults are the flags' defaults (stdlib + msgpack only)

    sd = ServerConfig()
    s = sub.add_parser("serve", help="serve a policy over websockets (msgpack; rollout/protocol.py) to robot computers")
    s.add_argument("--policy", required=True)
    s.add_argument("--host", default=sd.host, help="bind address; anything beyond loopback needs --token")
    s.add_argument("--port", type=int, default=sd.port, help="0 = any free port (printed)")
    s.add_argument("--token", default=sd.token, help="auth token clients must send (default: $POLICY_SERVER_TOKEN)")
    s.add_argument("--max-message-bytes", type=positive_int, default=sd.max_message_bytes)
    s.add_argument("--rate-limit", type=positive_float, default=sd.rate_hz,
                   help="messages per second per session (sustained)")
    s.add_argument("--burst", type=positive_int, default=sd.burst, help="messages per session above the sustained rate")
    s.add_argument("--max-sessions", type=positive_int, default=sd.max_sessions, help="sessions past hello served at once")
    s.add_argument("--max-pending", type=positive_int, default=sd.max_pending,
                   help="connections that have not yet said hello (each closed after --hello-timeout)")
    s.add_argument("--hello-timeout", type=positive_float, default=sd.hello_timeout_s,
                   help="seconds a new connection has to authenticate with hello")
    s.add_argument("--max-pending-per-address", type=positive_int, default=sd.max_pending_per_address,
                   help="connections one client address may have waiting for hello")
    s.add_argument("--max-sessions-per-address", type=positive_int, default=sd.max_sessions_per_address,
                   help="sessions one client address may hold (robots behind one NAT share an address)")
    s.add_argument("--auth-backoff-after", type=positive_int, default=sd.auth_backoff_after,
                   help="failed logins from one address before it is refused for a while")
    s.add_argument("--auth-backoff", type=positive_float, default=sd.auth_backoff_s,
                   help="seconds of the first refusal; doubles with each further failure")
    s.add_argument("--auth-backoff-max", type=positive_float, default=sd.auth_backoff_max_s,
                   help="longest refusal in seconds")
    s.add_argument("--model-thread", action="store_true", default=sd.model_thread,
                   help="run model calls on a worker thread (the loop stays responsive during long steps)")
    s.add_argument("--max-batch", type=positive_int, default=sd.max_batch,
                   help="sessions stepped together in one batched model call (1 = no batching)")
    s.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_serve)

    pc = sub.add_parser("plot-curves", help="plot training curves (loss, token accuracy, eval success) of runs side by side")
    pc.add_argument("runs", nargs="+", help="run directories written by `train` (their tb/ event files are read)")
    pc.add_argument("--out", required=True, metavar="PNG")
    pc.add_argument("--labels", default=None, help="comma list, one per run (default: the run directory names)")
    pc.add_argument("--tags", default=None,
                    help="comma list of TensorBoard tags (default: train/loss, train/token_accuracy, eval/success_rate where logged)")
    pc.add_argument("--smooth", type=int, default=1, help="moving average over this many logged points")
    pc.add_argument("--title", default=None)
    pc.set_defaults(fn=cmd_plot_curves)

    i = sub.add_parser("inspect-data", help="print an RLDS dataset's schema, counts, instructions and action statistics")
    i.add_argument("data")
    i.add_argument("--split", default="train")
    i.add_argument("--standardization", default="auto",
                   help="'auto', a registry entry (tabletop, metaworld, bridge, fractal20220817_data, "
                        "language_table) or a YAML file of entries (docs/DATA.md)")
    i.add_argument("--camera", default=None, help="camera key (default: the entry's first camera)")
    i.set_defaults(fn=cmd_inspect)

    for sp in (c, t, e, d, b, s, i, pc):
        sp.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("POLICY_STACK_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
