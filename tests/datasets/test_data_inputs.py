"""Training inputs from real RLDS files: statistics, windows, DDP shards, mixtures, determinism, augmentation."""
import numpy as np
import pytest

from datasets.rlds_dataset import RLDSDataset
from datasets.sequences import SequenceSpec, make_sequences
from datasets.training_inputs import open_training_inputs
from policy.config import MixtureEntry, load_config
from policy.language import sentencepiece_model
from tests.helpers import ROOT
from tests.helpers import write_dataset

LENGTHS = [5, 8, 3, 6, 4, 7]


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTM_POLICY_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "ds", LENGTHS, ["touch the red block", "touch the blue block"],
                         episodes_per_shard=2)


def cfg_for(*overrides, T=1, sequence="window"):
    return load_config(ROOT / "configs" / "quickstart.yaml", [
        "model.image.image_size=16", "train.batch_size=4", f"data.sequence={sequence}",
        f"data.sequence_length={T}", f"model.controller.memory_horizon={T if sequence == 'window' else 0}",
        *overrides])


def test_stats_exact_on_a_hand_made_dataset(dataset, tmp_path):
    path, eps = dataset
    a = np.concatenate([np.stack(e.actions) for e in eps]).astype(np.float64)  # the is_last step excluded
    ds = RLDSDataset(path)
    s = ds.scan()["action_stats"]
    for k, ref in {"mean": a.mean(0), "std": a.std(0), "min": a.min(0), "max": a.max(0),
                   "p01": np.percentile(a, 1, axis=0), "p99": np.percentile(a, 99, axis=0)}.items():
        np.testing.assert_allclose(s[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)
    assert s["count"] == sum(LENGTHS) and ds.scan()["max_episode_length"] == 8
    cached = list(path.glob("scan-train-*.json"))
    assert len(cached) == 1  # computed once, cached beside the (writable) dataset
    again = RLDSDataset(path)
    again.episode_tensors = None  # a second open must not re-read the episodes
    assert again.scan()["action_stats"] == s


def _locate(eps, action):
    for k, e in enumerate(eps):
        for t, a in enumerate(e.actions):
            if np.array_equal(a, action):
                return k, t
    raise AssertionError("action not in the written data")


def test_windows_never_cross_episodes(dataset):
    path, eps = dataset
    ds = RLDSDataset(path)
    ids = {s: i for i, s in enumerate(ds.instructions)}
    T = 4
    wins = list(make_sequences(ds, SequenceSpec("window", T, 0), ids, shuffle=True, seed=3, cache=False)
                .as_numpy_iterator())
    assert len(wins) == sum(LENGTHS)
    for w in wins:
        n = int(w["mask"].sum())
        assert w["mask"].tolist() == [False] * (T - n) + [True] * n  # padding only at the start
        k, t = _locate(eps, w["action"][T - n])
        end = t + n - 1
        np.testing.assert_array_equal(w["action"][T - n:], np.stack(eps[k].actions[t:end + 1]))
        np.testing.assert_array_equal(w["image"][T - n:], np.stack([o["image"] for o in eps[k].observations[t:end + 1]]))
        assert n == min(T, end + 1)  # the window starts at the episode start or spans T steps
        assert w["instruction"] == ids[eps[k].metadata["instruction"]]
        assert not w["action"][: T - n].any()


def _episodes_of_rank(path, eps, rank, world):
    ds = RLDSDataset(path)
    ids = {s: i for i, s in enumerate(ds.instructions)}
    seqs = make_sequences(ds, SequenceSpec("episode", 10, 0), ids, shuffle=True, seed=0, cache=False,
                          shard=(rank, world))
    return {_locate(eps, e["action"][0])[0] for e in seqs.as_numpy_iterator()}


def test_two_ranks_see_disjoint_data(dataset):
    path, eps = dataset
    r0, r1 = _episodes_of_rank(path, eps, 0, 2), _episodes_of_rank(path, eps, 1, 2)
    assert r0 and r1 and not (r0 & r1) and r0 | r1 == set(range(len(eps)))
    ti = open_training_inputs(cfg_for(), path, rank=1, world_size=2, seed=0, repeat=False)
    seen = {_locate(eps, a)[0] for b in ti.batches() for a in b["action"][:, -1].numpy()}
    assert seen == r1  # the training stream of rank 1 holds exactly its shard
    with pytest.raises(ValueError, match="rank/world_size"):
        open_training_inputs(cfg_for(), path, rank=2, world_size=2)


def test_batches_are_deterministic_for_a_seed(dataset):
    path, _ = dataset
    cfg = cfg_for("data.crop_pad=2", T=2)
    a = [next(open_training_inputs(cfg, path, seed=7).batches()) for _ in range(1)][0]
    b = next(open_training_inputs(cfg, path, seed=7).batches())
    c = next(open_training_inputs(cfg, path, seed=8).batches())
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert not np.array_equal(a["action"].numpy(), c["action"].numpy())
    assert set(a) == {"image", "action", "proprio", "mask", "instruction"}
    assert tuple(a["image"].shape) == (4, 2, 16, 16, 3) and str(a["image"].dtype) == "torch.uint8"


def test_crop_pad_shifts_whole_sequences(dataset):
    path, eps = dataset
    ds = RLDSDataset(path)
    ids = {s: i for i, s in enumerate(ds.instructions)}
    spec = SequenceSpec("episode", 10, 0, crop_pad=3)
    plain = {tuple(np.round(e["action"][0], 6)): e["image"] for e in
             make_sequences(ds, SequenceSpec("episode", 10, 0), ids, True, 0, False).as_numpy_iterator()}
    shifted = 0
    for e in make_sequences(ds, spec, ids, True, 0, False).as_numpy_iterator():
        ref = plain[tuple(np.round(e["action"][0], 6))]
        assert e["image"].shape == ref.shape
        shifted += int(not np.array_equal(e["image"], ref))
        # one offset per sequence: each frame is the reference frame shifted by the same (dy, dx)
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if np.array_equal(e["image"][:, 3:-3, 3:-3], ref[:, 3 + dy:13 + dy, 3 + dx:13 + dx])]
        assert found
    assert shifted >= 1


def test_skipping_batches_continues_the_stream_exactly_across_epochs(dataset):
    """Exact resume skips the batches a run consumed: with per-epoch crop offsets and reshuffling, the
    skipped stream must still equal the rest of the uninterrupted one (here ~8 batches per epoch)."""
    path, _ = dataset
    cfg = cfg_for("data.crop_pad=2", T=2)
    full = open_training_inputs(cfg, path, seed=3).batches()
    whole = [next(full) for _ in range(20)]
    rest = open_training_inputs(cfg, path, seed=3).batches(10)
    for a in whole[10:]:
        b = next(rest)
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


def test_crop_pad_draws_new_offsets_each_epoch(tmp_path):
    """Training repeats the stream: each epoch must crop each sequence at a fresh offset, not replay the
    first epoch's offsets. One shard: the episode order is the same each epoch, so a replayed offset
    stream would give every episode the same fixed shift for the whole run."""
    path, _ = write_dataset(tmp_path / "one", LENGTHS, ["touch the red block"], episodes_per_shard=len(LENGTHS))
    ds = RLDSDataset(path)
    ids = {s: i for i, s in enumerate(ds.instructions)}
    plain = {tuple(np.round(e["action"][0], 6)): e["image"] for e in
             make_sequences(ds, SequenceSpec("episode", 10, 0), ids, True, 0, False).as_numpy_iterator()}
    offsets: dict[tuple, list] = {}
    for e in make_sequences(ds, SequenceSpec("episode", 10, 0, crop_pad=3), ids, True, 0, False
                            ).repeat(2).as_numpy_iterator():
        key = tuple(np.round(e["action"][0], 6))
        ref = plain[key]
        offsets.setdefault(key, []).append(next(
            (dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
            if np.array_equal(e["image"][:, 3:-3, 3:-3], ref[:, 3 + dy:13 + dy, 3 + dx:13 + dx])))
    assert len(offsets) == len(plain) >= 4 and all(len(v) == 2 for v in offsets.values())
    assert sum(a != b for a, b in offsets.values()) >= len(offsets) - 1, offsets  # 1/49 to repeat by chance


def test_a_second_stream_of_the_same_inputs_is_rebuilt_from_its_seeds(dataset):
    """The trainer opens the inputs once and asks for the stream after `skip` batches (resume): a stream
    asked for after the first is rebuilt from the seeds, never continued from an iterator already read."""
    path, _ = dataset
    ti = open_training_inputs(cfg_for("data.crop_pad=2", T=2), path, seed=3)
    first = ti.batches()
    whole = [next(first) for _ in range(20)]
    for skip in (0, 10):
        again = ti.batches(skip)
        for a in whole[skip:skip + 10]:
            b = next(again)
            for k in a:
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


def test_mixture_weights_are_respected(tmp_path):
    a, _ = write_dataset(tmp_path / "a", [6] * 6, ["open the drawer"], seed=1)
    b, _ = write_dataset(tmp_path / "b", [6] * 6, ["close the drawer"], seed=2)
    cfg = cfg_for("train.batch_size=50")
    cfg.data.mixture = [MixtureEntry(str(a), 3.0), MixtureEntry(str(b), 1.0)]
    ti = open_training_inputs(cfg, None, seed=0)
    assert ti.instructions == ["close the drawer", "open the drawer"] and ti.weights == [0.75, 0.25]
    batches = ti.batches()
    picks = np.concatenate([next(batches)["instruction"].numpy() for _ in range(8)])
    frac = float((picks == 1).mean())
    assert 0.65 < frac < 0.85, frac
    assert ti.scan["num_transitions"] == 72
    with pytest.raises(ValueError, match="both"):
        open_training_inputs(cfg, a)


def test_instruction_embedding_reaches_batches(bridge_dir):
    cfg = cfg_for("model.image.image_size=32", T=3)
    ti = open_training_inputs(cfg, bridge_dir, seed=0)
    b = next(ti.batches())
    assert tuple(b["instruction_embedding"].shape) == (4, 512) and tuple(b["image"].shape) == (4, 3, 32, 32, 3)
    assert tuple(b["proprio"].shape) == (4, 3, 7) and ti.dataset.entry.name == "bridge"


def test_tokenizer_trained_once_and_cached(tmp_path):
    instr = ["touch the red block", "touch the blue block"]
    m1 = sentencepiece_model(instr, 32, cache_dir=tmp_path / "tok")
    stamp = m1.stat().st_mtime_ns
    m2 = sentencepiece_model(list(reversed(instr)), 32, cache_dir=tmp_path / "tok")
    assert m1 == m2 and m2.stat().st_mtime_ns == stamp
    assert sentencepiece_model(instr, 48, cache_dir=tmp_path / "tok") != m1
    copy = sentencepiece_model(instr, 32, given=m1, out_path=tmp_path / "run" / "tokenizer.model")
    assert copy.read_bytes() == m1.read_bytes()
    with pytest.raises(FileNotFoundError, match="data.sentencepiece_model"):
        sentencepiece_model(instr, 32, given=tmp_path / "missing.model")


def test_bench_data_reports_rate_first_batch_and_memory(dataset):
    from rollout.bench.data import bench_data

    path, _ = dataset
    res = bench_data(str(path), ROOT / "configs" / "quickstart.yaml", batch_size=4, window=2, image_size=16,
                     minutes=0.03, threads=0, sample_every_s=0.5)
    assert res["frames_per_s"] > 0 and res["time_to_first_batch_s"] > 0 and res["batches"] > 0
    assert res["first_batch_shape"] == [4, 2, 16, 16, 3] and len(res["rss_samples"]) >= 2
    assert set(res["rss_mb"]) == {"before_open", "start", "minute_2", "end", "min", "max"}


def test_shards_are_read_round_robin_so_tasks_mix_from_the_first_episodes(tmp_path):
    """A dataset written one task per shard (as `collect` does with one worker) must not feed training
    one task after another: consecutive episodes come from different shards."""
    tasks = [f"task {c}" for c in "abcd"]
    path, _ = write_dataset(tmp_path / "ds", [3] * 12, [t for t in tasks for _ in range(3)], episodes_per_shard=3)
    ds = RLDSDataset(path)
    for seed in (0, 1):
        eps = ds.episode_tensors(decode_images=False, shuffle_files=True, seed=seed)
        first = [ep["instruction"][0].decode() for ep in eps.take(4).as_numpy_iterator()]
        assert sorted(first) == tasks, first
    # Unshuffled reads (inspection, statistics) keep the dataset's own order.
    order = [ep["instruction"][0].decode() for ep in ds.episode_tensors(decode_images=False).as_numpy_iterator()]
    assert order == [t for t in tasks for _ in range(3)]


def test_instruction_missing_from_a_stale_scan_cache_is_named(dataset):
    import json

    from datasets.source import DatasetError

    path, _ = dataset
    RLDSDataset(path).scan()
    (cache,) = path.glob("scan-train-*.json")
    record = json.loads(cache.read_text())
    # A cache whose content key still matches but whose scan is wrong (edited by hand, or written by a
    # buggy version): the missing instruction is still named when its first batch is read.
    record["scan"]["instructions"] = ["touch the red block"]
    cache.write_text(json.dumps(record))
    inputs = open_training_inputs(cfg_for(), path)
    assert inputs.instructions == ["touch the red block"]
    with pytest.raises(DatasetError, match=rf"dataset '{path}': instruction 'touch the blue block' is not in the "
                                           rf"instruction list of the scan cache '{cache}' \(stale: delete that file"):
        batches = inputs.batches()
        for _ in range(10):  # both instructions appear within the first batches
            next(batches)
