"""Behaviour cloning: RLDS sequences -> cross-entropy over discretised action tokens.

The loss is averaged over every action token of every valid step (RT-1). Output: a self-contained
policy directory (see policy/policy_dir.py) under RUN_DIR/policy, checkpoints that resume exactly
under RUN_DIR/checkpoints (policy/checkpoint.py), TensorBoard scalars under RUN_DIR/tb, rollout videos
of the evaluation in the loop under RUN_DIR/eval. One process, or one per device under torchrun
(policy/distributed.py). docs/TRAINING.md describes the run directory and the knobs.

Reproducibility: the data order is a pure function of (seed, rank, world size, step): the tf.data
pipeline is re-created from its seeds and the consumed micro-batches are skipped on resume; the
augmentation and dropout RNGs are re-seeded from (seed, rank, step) at every step.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.atomic import copy_file_atomic, naming_write_errors, write_text_atomic
from datasets.augment import random_shift
from policy import checkpoint as ckpt
from policy.action_tokenizer import ActionTokenizer, action_tokenizer_from_dict
from policy.config import ConfigError, ExperimentConfig, config_to_dict
from policy.distributed import (DistInfo, barrier, in_launched_group, init_distributed, keep_until_exit,
                                mean_over_ranks, run_local_group, shutdown, sync_buffers, wrap_model)
from policy.language import TextTokenizer
from policy.policy_dir import (InputSpec, describe_non_finite, non_finite_tensors, read_spec_and_stats,
                               save_policy_dir)
from policy.train_step import EMA, Optimization, StepStats, TrainingError

if TYPE_CHECKING:
    from datasets.training_inputs import TrainingInputs

__all__ = ["train", "Trainer", "Evaluator", "TrainResult", "TrainingError", "check_writable", "lr_lambda", "sequence_loss",
           "init_from_policy"]


@dataclass
class TrainResult:
    run_dir: str
    policy_dir: str
    steps: int
    final_loss: float
    final_token_accuracy: float
    seconds: float
    samples_per_second: float
    skipped_steps: int = 0
    resumed_from_step: int = 0
    world_size: int = 1
    eval: dict = field(default_factory=dict)  # the last evaluation in the loop, if any

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def check_writable(out_dir: Path, need_bytes: int = 50 << 20) -> None:
    """Fail before training when the output cannot be written (permissions or a full disk)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OSError(f"--out {str(out_dir)!r}: expected a writable directory: {exc.strerror or exc}") from None
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise OSError(f"--out {str(out_dir)!r}: expected at least {need_bytes >> 20} MiB free, "
                      f"the disk has {free >> 20} MiB")


def check_new_run_dir(out_dir: Path) -> None:
    """A new run must not start where another run lives: its run.json would be replaced and checkpoint
    rotation (the K highest step numbers) would delete the new run's checkpoints, so that a later
    --resume would load the old run."""
    held = [name for name in (ckpt.RUN_FILE, ckpt.checkpoints_dir(out_dir).name) if (out_dir / name).exists()]
    if held:
        raise FileExistsError(f"--out {str(out_dir)!r}: expected a new or empty run directory, it holds a training "
                              f"run ({', '.join(held)}); continue it with --resume {str(out_dir)!r}, or train into "
                              "a new directory")


# Keys a resumed run may change: none touches the data stream, the weights' shapes or the optimizer state,
# so they apply from the resumed step on. Every other key is refused (check_resume_config).
RESUME_CHANGEABLE = frozenset({
    "name", "train.steps", "train.warmup_steps", "train.grad_clip", "train.label_sigma", "train.max_bad_steps",
    "train.ema_decay", "train.device", "train.autocast", "train.compile", "train.num_threads", "train.log_every",
    "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_episodes", "train.eval_videos",
    "data.parallel_calls"})


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _why_fixed_on_resume(key: str) -> str:
    if key.startswith("data.") or key in ("train.batch_size", "train.grad_accum", "train.seed", "train.processes"):
        return ("it changes the data stream, and resume skips the micro-batches the run consumed from its own "
                "stream, so the run would not continue where it stopped")
    if key in ("train.lr", "train.weight_decay", "train.optimizer"):
        return "the optimizer and scheduler state restored from the checkpoint keep the run's value"
    if key.startswith("model."):
        return "the checkpoint's weights are those of the run's model"
    return "it applies when a run starts (fine-tuning set-up)"


def _dataset_ref(path: str | Path) -> str:
    """How run.json records a dataset: absolute for local paths, as given for bucket URLs."""
    return str(path) if "://" in str(path) else str(Path(path).resolve())


def check_resume_config(cfg: ExperimentConfig, meta: dict, data_path: str | Path | None, run_dir: Path) -> None:
    """Refuse, naming the key and why, a resume whose config or --data differs from the run's (run.json) in
    anything but RESUME_CHANGEABLE: such a change was silently ignored or broke the exact continuation."""
    if data_path and (meta.get("data") is None or _dataset_ref(data_path) != meta["data"]):
        raise ConfigError(f"--data {str(data_path)!r}: expected none or the run's dataset ({meta.get('data')!r}"
                          f"{', a data.mixture run' if meta.get('data') is None else ''}) on --resume "
                          f"{str(run_dir)!r}: {_why_fixed_on_resume('data.')}")
    old, new = _flat(meta["config"]), _flat(config_to_dict(cfg))
    changed = [k for k in new if k in old and new[k] != old[k] and k not in RESUME_CHANGEABLE]
    if changed:
        raise ConfigError(f"--resume {str(run_dir)!r}: " + "; ".join(
            f"{k} cannot change on resume ({_why_fixed_on_resume(k)}): the run has {old[k]!r}, got {new[k]!r}"
            for k in changed) + ". Start a new run for that (train.init_from=RUN_DIR/policy copies "
            "train.init_modules of its weights)")


def action_bounds(cfg: ExperimentConfig, stats: dict, action_dim: int) -> tuple[list[float], list[float]]:
    if cfg.data.action_bounds == "spec":
        low, high = list(cfg.data.action_low), list(cfg.data.action_high)
        if len(low) != action_dim:
            raise ConfigError(f"data.action_low: expected {action_dim} values (the dataset's action size), got {len(low)}")
    else:
        low, high = list(stats["min"]), list(stats["max"])
    return low, high


def lr_lambda(cfg: ExperimentConfig):
    warm, total = cfg.train.warmup_steps, cfg.train.steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def soft_targets(targets: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """[...] bin indices -> [..., bins] Gaussian over the bins centred on each target, summing to 1."""
    centers = torch.arange(bins, dtype=torch.float32, device=targets.device)
    w = torch.exp(-0.5 * ((centers - targets.unsqueeze(-1).float()) / sigma) ** 2)
    return w / w.sum(-1, keepdim=True)


IMAGE_TOKENIZER = ("backbone", "token_learner", "image_pos")


def init_from_policy(model: torch.nn.Module, policy_dir: str | Path, modules: list[str],
                     allow_missing: bool = False) -> tuple[int, list[str]]:
    """Copy the tensors of `modules` (top-level PolicyModel children / parameters) from a policy
    directory's weights into `model`; returns (how many tensors were copied, the names of those the source
    lacks and that kept their fresh initialisation: only with allow_missing, else that is an error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(policy_dir) / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"train.init_from: expected a policy directory with model.safetensors, "
                          f"got {str(policy_dir)!r} (no {weights.name} there)")
    try:
        source = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"train.init_from: {str(weights)!r} is not a readable safetensors file: {exc}") from None
    from policy.config import MODULE_NAMES

    own = model.state_dict()
    unknown = [m for m in modules if m not in MODULE_NAMES]
    if unknown:
        raise ConfigError(f"train.init_modules: expected names from {list(MODULE_NAMES)}, got {unknown}")
    # A known module this config leaves out (image_pos with position_embedding false, as in the rt1
    # configs; proprio without use_proprio) has nothing to copy: the default list must work for them too.
    copied, missing = 0, []
    for name in own:
        if name.split(".")[0] not in modules:
            continue
        if name not in source:
            if not allow_missing:
                raise ConfigError(f"train.init_from: {str(weights)!r} has no tensor {name!r} "
                                  "(a different architecture? train.init_allow_missing starts such tensors fresh)")
            missing.append(name)
            continue
        if source[name].shape != own[name].shape:
            raise ConfigError(f"train.init_from: tensor {name!r}: expected shape {tuple(own[name].shape)} "
                              f"(this config), got {tuple(source[name].shape)} in {str(weights)!r}")
        own[name] = source[name]
        copied += 1
    model.load_state_dict(own)
    return copied, missing


def keyframe_weights(actions: torch.Tensor, mask: torch.Tensor, weight: float, threshold: float) -> torch.Tensor:
    """Per-step loss weights [B,T] for actions [B,T,A] and mask [B,T]: `weight` at valid steps whose action
    differs from the previous valid step's by more than `threshold` in some dimension, 1 at other valid
    steps, 0 at padding (train.keyframe_weight)."""
    m = mask.bool()
    change = (actions[:, 1:] - actions[:, :-1]).abs().amax(-1) > threshold
    key = torch.zeros_like(m)
    key[:, 1:] = change & m[:, 1:] & m[:, :-1]
    return m.float() * (1.0 + (weight - 1.0) * key.float())


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  label_sigma: float = 0.0, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over [B,T,A,bins] logits at valid steps, a weighted mean where `weights` [B,T] is given
    (zero at padding); returns (loss, per-dimension accuracy over the valid steps, unweighted)."""
    if label_sigma > 0:
        ce = -(soft_targets(targets, logits.shape[-1], label_sigma) * logits.log_softmax(-1)).sum(-1)
    else:
        ce = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(targets.shape)
    m = mask.unsqueeze(-1).to(ce.dtype)
    w = m if weights is None else weights.unsqueeze(-1).to(ce.dtype)
    loss = (ce * w).sum() / (w.sum().clamp_min(1e-12 if weights is not None else 1.0) * targets.shape[-1])
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).to(ce.dtype) * m
        acc = correct.sum(dim=(0, 1)) / m.sum().clamp_min(1.0)
    return loss, acc


# -- data ---------------------------------------------------------------------------------------
def _build_data(cfg: ExperimentConfig, data_path: str | Path | None, rank: int, world_size: int,
                seed: int) -> TrainingInputs:
    """This rank's share of the data (datasets/training_inputs.py) as micro-batches of
    batch_size / (world_size * grad_accum); `.batches(skip)` is the stream after `skip` micro-batches.
    Every rank passes the same seed: the shards are cut from the same seeded episode order, so they are
    disjoint."""
    from datasets.training_inputs import open_training_inputs

    micro = cfg.train.batch_size // (world_size * cfg.train.grad_accum)
    if micro < 1 or micro * world_size * cfg.train.grad_accum != cfg.train.batch_size:
        raise ConfigError(f"train.batch_size: expected a multiple of world size x train.grad_accum "
                          f"({world_size} x {cfg.train.grad_accum}), got {cfg.train.batch_size}")
    inputs = open_training_inputs(cfg, data_path, rank=rank, world_size=world_size, seed=seed, batch_size=micro)
    for ds in inputs.datasets:
        if ds.num_episodes < world_size:
            raise ConfigError(f"--data {ds.dir!r}: expected at least one episode per rank ({world_size} "
                              f"ranks), the dataset has {ds.num_episodes}")
    return inputs


# -- checks before the first step -----------------------------------------------------------------
def check_fits_dataset(cfg: ExperimentConfig, data: Any, source_spec: InputSpec | None) -> None:
    """A config that does not fit the dataset fails here, before any step, with the mismatch named."""
    h, w, c = data.image_shape
    if c != 3:
        raise ConfigError(f"data.camera {cfg.data.camera!r}: expected RGB frames (H,W,3), the dataset has {data.image_shape}")
    if cfg.model.image.image_size > min(h, w):
        raise ConfigError(f"model.image.image_size: expected <= the dataset's frame size ({h}x{w} at "
                          f"{cfg.data.camera!r} in {data.dir!r}; upsampling adds no information), "
                          f"got {cfg.model.image.image_size}")
    if cfg.data.action_bounds == "spec" and len(cfg.data.action_low) != data.action_dim:
        raise ConfigError(f"data.action_low: expected {data.action_dim} values (the dataset's action size), "
                          f"got {len(cfg.data.action_low)}")
    if cfg.data.sequence == "episode":
        longest = data.scan()["max_episode_length"]
        if longest > cfg.data.sequence_length:
            raise ConfigError(f"data.sequence_length: expected >= the longest episode ({longest} steps, in "
                              f"{data.dir!r}) so the memory sees whole episodes as at inference, "
                              f"got {cfg.data.sequence_length}")
    if cfg.train.eval_every and not data.sidecar.get("env"):
        raise ConfigError("train.eval_every: expected 0 for a dataset not collected in one of our simulators "
                          f"(no 'env' in {data.dir!r}/policy_stack.json), got {cfg.train.eval_every}")
    if source_spec is not None:
        if cfg.train.init_action_bounds and source_spec.action_dim != data.action_dim:
            raise ConfigError(f"train.init_action_bounds: the source policy has {source_spec.action_dim} action "
                              f"dimensions, the dataset {data.action_dim}")
        if cfg.model.use_proprio and "proprio" in " ".join(cfg.train.init_modules) \
                and source_spec.proprio_dim != data.proprio_dim:
            raise ConfigError(f"train.init_modules: the source policy's proprio size is {source_spec.proprio_dim}, "
                              f"the dataset's {data.proprio_dim}")


def checkpoint_bytes(model: torch.nn.Module, ema: bool) -> int:
    """Bytes one checkpoint takes: raw weights, policy weights, two Adam moments (+ EMA)."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return n * (5 if ema else 4)


def _source_policy(cfg: ExperimentConfig) -> tuple[Path, InputSpec, dict] | None:
    if not cfg.train.init_from:
        if cfg.train.init_tokenizer or cfg.train.init_action_bounds:
            raise ConfigError("train.init_tokenizer / train.init_action_bounds: expected train.init_from "
                              "(the policy directory to take them from), got none")
        return None
    src = Path(cfg.train.init_from)
    meta_file, stats_file = src / "policy.json", src / "action_stats.json"
    if not meta_file.is_file() or not stats_file.is_file():
        raise ConfigError(f"train.init_from: expected a policy directory with model.safetensors, "
                          f"got {str(src)!r} (no policy.json / action_stats.json there)")
    _, spec, stats = read_spec_and_stats(src, "train.init_from")
    return src, spec, stats


class _BCForward(torch.nn.Module):
    """Instruction encoding and the policy in one forward, so DDP sees every parameter's use."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, ids_mask, images, proprio, mask, embedding=None):
        context = (self.model.encode_embedding(embedding) if embedding is not None
                   else self.model.encode_instruction(ids, ids_mask))
        return self.model(images, context, proprio, mask)


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2 ** 63)


# -- the trainer -----------------------------------------------------------------------------------
# Evaluation in the loop is wired in by the caller (run_policy.py passes rollout.evaluate.in_loop_evaluator),
# so the trainer imports no simulator: (policy_dir, episodes_per_task, video_dir, videos_per_task) -> the
# evaluation's JSON (mean_success, per_task {task: {success_rate, ...}}, videos).
Evaluator = Callable[[Path, int, Path, int], dict]


class Trainer:
    """Set up once (data, tokenizers, model, optimizer, resume), then `run()` or `train_step()`."""

    def __init__(self, cfg: ExperimentConfig, data_path: str | Path | None, out_dir: str | Path,
                 progress: bool = True, resume: bool = False, info: DistInfo | None = None,
                 evaluator: Evaluator | None = None):
        self.cfg, self.out_dir, self.progress = cfg, Path(out_dir), progress
        if cfg.train.eval_every and evaluator is None:
            raise ConfigError(f"train.eval_every: expected 0 when no evaluator is wired in (run_policy.py train "
                              f"wires rollout.evaluate's; from Python pass Trainer(..., evaluator=...)), "
                              f"got {cfg.train.eval_every}")
        self.evaluator = evaluator
        self.info = info or init_distributed(cfg.train.device)
        t = cfg.train
        if t.processes > 1 and self.info.world_size != t.processes:
            raise ConfigError(f"train.processes: expected the group of {t.processes} processes that train() starts "
                              f"(or 1 under torchrun, which starts its own), this process is one of "
                              f"{self.info.world_size}")
        if resume:
            meta = ckpt.read_run_meta(self.out_dir)
            check_resume_config(cfg, meta, data_path, self.out_dir)
            data_path = data_path or meta["data"]
        else:  # every rank checks; rank 0 writes run.json only after the DDP set-up has synced them
            check_new_run_dir(self.out_dir)
        from datasets.training_inputs import check_data_source

        check_data_source(cfg, data_path)
        if self.info.is_main:
            check_writable(self.out_dir)
        self.data_path = str(data_path) if data_path else None
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)

        self.inputs = _build_data(cfg, data_path, self.info.rank, self.info.world_size, t.seed)
        keep_until_exit(self)  # in a train.processes member its input pipeline must outlive the run
        data = self.dataset = self.inputs.dataset
        source = _source_policy(cfg)
        for ds in self.inputs.datasets:  # every dataset of a mixture, not only the first
            check_fits_dataset(cfg, ds, source[1] if source else None)
        scan = self.inputs.scan
        self.uses_embedding = cfg.model.language.source == "embedding"
        if self.uses_embedding and self.inputs.embedding_dim != 512:
            raise ConfigError("model.language.source: 'embedding' expects every dataset to ship a precomputed "
                              "512-d instruction embedding (Open X-Embodiment's natural_language_embedding), got "
                              + (f"{self.inputs.embedding_dim}-d" if self.inputs.embedding_dim else "none")
                              + f" in {data.dir!r}")
        self.action_stats = scan["action_stats"]

        # Tokenizers: explicit about where they come from (a resumed run keeps its own).
        if self.info.is_main:
            work = self.out_dir / "work"
        else:  # other ranks only need a tokenizer to read; theirs goes when the process ends
            work = Path(tempfile.mkdtemp(prefix="policy-stack-rank-"))
            atexit.register(shutil.rmtree, work, True)
        work.mkdir(parents=True, exist_ok=True)
        tok_path = work / "tokenizer.model"
        if resume and tok_path.is_file():
            pass
        elif source and t.init_tokenizer:
            copy_file_atomic(source[0] / "tokenizer.model", tok_path)
        else:
            from policy.language import sentencepiece_model

            # data.sentencepiece_model when given, else trained on the instructions (cached by their digest)
            sentencepiece_model(self.inputs.instructions, cfg.model.language.vocab_size,
                                cfg.data.sentencepiece_model, tok_path)
        self.tok_path = tok_path
        text = TextTokenizer(tok_path, cfg.model.language.max_tokens)
        text.check_fits(self.inputs.instructions)
        self.instr_ids, self.instr_mask = (torch.from_numpy(a) for a in text.encode(self.inputs.instructions))
        if source and t.init_action_bounds:
            try:
                self.action_tok = action_tokenizer_from_dict(source[2]["tokenizer"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"train.init_from {str(source[0])!r}: action_stats.json 'tokenizer': expected "
                                  f"the source policy's action tokenizer, got an invalid one: {exc!r}") from None
            if not isinstance(self.action_tok, ActionTokenizer):
                raise ConfigError("train.init_action_bounds: expected a source policy with a vector action "
                                  f"tokenizer (this trainer reads flat action vectors), got {source[0]}'s dict tokenizer")
            if self.action_tok.num_tokens != data.action_dim or self.action_tok.bins != cfg.model.action_bins:
                raise ConfigError(f"train.init_action_bounds: the source tokenizer has {self.action_tok.num_tokens} "
                                  f"dimensions x {self.action_tok.bins} bins, this run needs {data.action_dim} x "
                                  f"{cfg.model.action_bins} (model.action_bins)")
        else:
            low, high = action_bounds(cfg, self.action_stats, data.action_dim)
            names = data.sidecar.get("action_names")
            self.action_tok = ActionTokenizer(low, high, cfg.model.action_bins,
                                              names if names and len(names) == data.action_dim else None,
                                              tokenization=cfg.model.action_tokenization)

        from policy.backbones.pretrained import no_pretrained_load
        from policy.model import PolicyModel

        # A resumed run's weights come from its checkpoint: the ImageNet file (model.image.pretrained) is
        # read only when a run starts.
        with no_pretrained_load() if resume else contextlib.nullcontext():
            model = PolicyModel(cfg.model, vocab_size=text.vocab_size, num_action_dims=data.action_dim,
                                proprio_dim=data.proprio_dim)
        if t.init_from:
            _, fresh = init_from_policy(model, t.init_from, list(t.init_modules), t.init_allow_missing)
            if fresh and self.info.is_main:
                print(f"train.init_from: {len(fresh)} tensors not in {t.init_from} start fresh "
                      f"(train.init_allow_missing): {', '.join(fresh)}", flush=True)
        self.frozen = [getattr(model, n) for n in IMAGE_TOKENIZER if getattr(model, n, None) is not None] \
            if t.freeze_image_tokenizer else []
        for part in self.frozen:
            for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters()):
                p.requires_grad_(False)
        self.model = model.to(self.info.device)
        self._set_train_mode()
        if self.info.is_main:
            need = checkpoint_bytes(model, t.ema_decay > 0) * (t.keep_checkpoints + 2) + (50 << 20)
            check_writable(self.out_dir, need)
        params = [p for p in model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        # fused: one kernel over all parameters instead of a few ops per tensor (a quickstart step's update
        # took 30 ms with the default, 7.5 ms fused, on 1 CPU thread)
        self.optimizer = opt_cls(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        wrapped: torch.nn.Module = wrap_model(_BCForward(model), self.info)
        if t.compile:
            wrapped = torch.compile(wrapped)
        self.forward = wrapped
        self.opt = Optimization(model, wrapped, self.optimizer, self.scheduler, t.grad_clip, t.autocast, self.info,
                                self.ema, t.max_bad_steps)
        self.aug_gen = torch.Generator().manual_seed(t.seed)
        self.spec = InputSpec(camera_key=(getattr(data, "camera", None) or cfg.data.camera).split("/")[-1], image_shape=tuple(data.image_shape),
                              proprio_key=cfg.data.proprio_key.split("/")[-1] if cfg.model.use_proprio else None,
                              proprio_dim=data.proprio_dim, action_dim=data.action_dim,
                              env={k: data.sidecar[k] for k in ("env", "camera", "image_size", "tasks")
                                   if k in data.sidecar})
        self.step = 0
        self.samples = 0
        self.last_loss = self.last_accuracy = float("nan")  # of the last step that was not skipped
        self.resumed_from = 0
        self._last_batch: dict | None = None
        if resume:
            self._resume()
            if self.info.is_main:  # the merged config (e.g. a new train.steps) is what the next --resume reads
                ckpt.write_run_meta(self.out_dir, {**meta, "config": config_to_dict(cfg)})
        elif self.info.is_main:
            ckpt.write_run_meta(self.out_dir, {"data": _dataset_ref(self.data_path) if self.data_path else None,
                                               "config": config_to_dict(cfg), "world_size": self.info.world_size})
        self._batches = self.inputs.batches(self.step * t.grad_accum)

    def _set_train_mode(self) -> None:
        self.model.train()
        for part in self.frozen:
            if isinstance(part, torch.nn.Module):
                part.eval()  # BatchNorm statistics stay those of the source policy

    # -- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "rng": ckpt.capture_rng({"augment": self.aug_gen}),
                "data_position": self.step * self.cfg.train.grad_accum, "world_size": self.info.world_size,
                "bad_in_a_row": self.opt.bad_in_a_row, "skipped_total": self.opt.skipped_total,
                "samples": self.samples, "last_loss": self.last_loss, "last_accuracy": self.last_accuracy}

    def _resume(self) -> None:
        ckpt.remove_stale_staging(self.out_dir)
        last = ckpt.latest_checkpoint(self.out_dir)
        if last is None:  # killed before the first checkpoint: starting over is the exact continuation
            if self.info.is_main:
                print(f"resume: no checkpoint in {self.out_dir} yet; starting from step 0", file=sys.stderr)
            return
        state = ckpt.load_train_state(last)
        if self.cfg.train.steps < int(state["step"]):
            raise ConfigError(f"train.steps: expected >= {int(state['step'])}, the step --resume "
                              f"{str(self.out_dir)!r} continues from (its newest checkpoint), got {self.cfg.train.steps}")
        if state["world_size"] != self.info.world_size:
            raise ckpt.CheckpointError(f"--resume {str(self.out_dir)!r}: expected the run's world size "
                                       f"({state['world_size']} processes; the data is sharded by rank), "
                                       f"got {self.info.world_size}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ckpt.CheckpointError(f"checkpoint {str(last)!r}: has no EMA weights but train.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        ckpt.restore_rng(state["rng"], {"augment": self.aug_gen})
        self.step = self.resumed_from = int(state["step"])
        self.opt.bad_in_a_row, self.opt.skipped_total = int(state["bad_in_a_row"]), int(state["skipped_total"])
        self.samples = int(state["samples"])
        self.last_loss, self.last_accuracy = float(state["last_loss"]), float(state["last_accuracy"])

    def _policy_model(self) -> torch.nn.Module:
        if self.ema is None:
            return self.model
        model = copy.deepcopy(self.model)  # the saved policy runs the EMA weights
        model.load_state_dict(self.ema.shadow)
        return model

    def _write_policy(self, path: Path, model: torch.nn.Module | None = None) -> Path:
        model = model if model is not None else self._policy_model()
        return save_policy_dir(path, self.cfg, model, self.tok_path, self.action_tok, self.action_stats, self.spec,
                               extra={"trained_steps": self.step, "dataset": self.dataset.dir,
                                      "ema_decay": self.cfg.train.ema_decay})

    def check_publishable(self, model: torch.nn.Module) -> None:
        """Refuse (TrainingError) to write weights that are not finite, or whose evaluation-mode logits on
        the last training batch are not: such a policy returns NaN actions (e.g. after train.lr=1e30 the
        weights stay finite but BatchNorm statistics and activations overflow). Nothing is written then,
        so the newest checkpoint on disk and RUN_DIR/policy stay the last good ones."""
        def refuse(what: str) -> TrainingError:
            last = ckpt.latest_checkpoint(self.out_dir)
            keep = (f"the last good checkpoint {str(last)!r} is kept" if last is not None
                    else "no earlier checkpoint exists")
            return TrainingError(f"step {self.step}: refusing to save a policy {what}; {keep}; lower train.lr "
                                 "(and check the data's action statistics), then train again or --resume")

        # The trained weights go into the checkpoint, the EMA weights (when on) into the policy.
        bad = non_finite_tensors(self.model) + (non_finite_tensors(model) if model is not self.model else [])
        if bad:
            raise refuse(f"with non-finite weights: {len(bad)} tensors contain NaN or inf ({describe_non_finite(bad)})")
        batch = self._last_batch
        if batch is None:
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                dev = self.info.device
                idx = batch["instruction"][:2]
                proprio = batch.get("proprio")
                embedding = batch.get("instruction_embedding") if self.uses_embedding else None
                logits = _BCForward(model)(self.instr_ids[idx].to(dev), self.instr_mask[idx].to(dev),
                                           batch["image"][:2].to(dev),
                                           proprio[:2].to(dev) if proprio is not None else None,
                                           batch["mask"][:2].to(dev),
                                           embedding[:2].float().to(dev) if embedding is not None else None)
        finally:
            if was_training:
                self._set_train_mode()
        if not bool(torch.isfinite(logits).all()):
            frac = float((~torch.isfinite(logits)).float().mean())
            raise refuse(f"whose actions are not finite: on the last training batch, {frac:.0%} of its "
                         "evaluation-mode action logits are NaN or inf")

    def save(self) -> Path:
        """Checkpoint + RUN_DIR/policy (rank 0 writes; call on every rank), after check_publishable."""
        sync_buffers(self.model, self.info)
        if self.info.is_main:
            model = self._policy_model()
            self.check_publishable(model)
            with naming_write_errors(ckpt.checkpoints_dir(self.out_dir) / f"step-{self.step:08d}"):
                ckpt.save_checkpoint(self.out_dir, self.step, self._state(), lambda p: self._write_policy(p, model),
                                     self.cfg.train.keep_checkpoints)
            with naming_write_errors(self.out_dir / "policy"):
                self._write_policy(self.out_dir / "policy", model)
        barrier(self.info)
        return self.out_dir / "policy"

    # -- one step ------------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.info.device
        images = random_shift(batch["image"], self.cfg.data.random_shift, self.aug_gen).to(dev)
        idx = batch["instruction"]
        proprio = batch.get("proprio")
        mask = batch["mask"].to(dev)
        embedding = batch["instruction_embedding"].float().to(dev) if self.uses_embedding else None
        logits = self.forward(self.instr_ids[idx].to(dev), self.instr_mask[idx].to(dev), images,
                              proprio.to(dev) if proprio is not None else None, mask, embedding)
        targets = self.action_tok.tokenize(batch["action"]).to(dev)
        weights = batch["loss_weight"].to(dev) if "loss_weight" in batch else None
        loss, acc = sequence_loss(logits.float(), targets, mask, self.cfg.train.label_sigma, weights)
        return loss, acc, mask.sum()

    def train_step(self) -> tuple[StepStats, float]:
        """One optimizer step; returns its stats and the seconds spent waiting for data."""
        seed = _step_seed(self.cfg.train.seed, self.info.rank, self.step)
        self.aug_gen.manual_seed(seed)
        torch.manual_seed(seed)  # dropout: a pure function of (seed, rank, step), resumable
        t0 = time.perf_counter()
        micro = [next(self._batches) for _ in range(self.cfg.train.grad_accum)]
        t = self.cfg.train
        if t.keyframe_weight != 1:
            for b in micro:  # TrainStep weighs micro-batches by these sums: accumulation stays one big batch
                b["loss_weight"] = keyframe_weights(b["action"], b["mask"], t.keyframe_weight, t.keyframe_threshold)
        self._last_batch = micro[-1]  # what check_publishable runs the policy on
        wait = time.perf_counter() - t0
        stats = self.opt.step(micro, self._loss, self.step)
        self.step += 1
        self.samples += stats.samples
        return stats, wait

    # -- evaluation in the loop ------------------------------------------------------------------------
    def evaluate_now(self, tb) -> dict:
        assert self.evaluator is not None  # checked in __init__ when eval_every is on
        rng = ckpt.capture_rng()
        threads = torch.get_num_threads()
        model = self._policy_model()
        self.check_publishable(model)
        with naming_write_errors(self.out_dir / "policy"):
            policy = self._write_policy(self.out_dir / "policy", model)
        try:
            out = self.evaluator(Path(policy), self.cfg.train.eval_episodes,
                                 self.out_dir / "eval" / f"step-{self.step:08d}", self.cfg.train.eval_videos)
        finally:
            torch.set_num_threads(threads)
            ckpt.restore_rng(rng)
        tb.add_scalar("eval/success_rate", out["mean_success"], self.step)
        for task, r in out["per_task"].items():
            tb.add_scalar(f"eval/success_{task}", r["success_rate"], self.step)
        if out["videos"]:
            tb.add_text("eval/videos", "\n\n".join(out["videos"]), self.step)
        return out

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm import tqdm

        t = self.cfg.train
        tb = None
        if self.info.is_main:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.out_dir / "tb"))
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and self.info.is_main))
        start = time.perf_counter()
        wait_s, samples0 = 0.0, self.samples
        last_eval: dict = {}
        try:
            while self.step < t.steps:
                stats, wait = self.train_step()
                wait_s += wait
                bar.update(1)
                step = self.step - 1
                if not stats.skipped:
                    self.last_loss, self.last_accuracy = stats.loss, float(stats.accuracy.mean())
                if step % t.log_every == 0 or self.step == t.steps:
                    acc = mean_over_ranks(stats.accuracy, self.info).cpu()
                    if tb is not None:
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        tb.add_scalar("train/loss", stats.loss, step)
                        tb.add_scalar("train/token_accuracy", float(acc.mean()), step)
                        for i, name in enumerate(self.action_tok.names):
                            tb.add_scalar(f"token_accuracy/{name}", float(acc[i]), step)
                        tb.add_scalar("train/lr", self.scheduler.get_last_lr()[0], step)
                        tb.add_scalar("train/grad_norm", stats.grad_norm, step)
                        tb.add_scalar("train/skipped_steps", self.opt.skipped_total, step)
                        tb.add_scalar("perf/samples_per_second",
                                      (self.samples - samples0) * self.info.world_size / elapsed, step)
                        tb.add_scalar("perf/data_wait_fraction", wait_s / elapsed, step)
                    bar.set_postfix(loss=f"{self.last_loss:.3f}", acc=f"{self.last_accuracy:.3f}",
                                    skipped=self.opt.skipped_total)
                if self.step == t.steps or (t.save_every and self.step % t.save_every == 0):
                    self.save()
                if t.eval_every and self.step % t.eval_every == 0:
                    if self.info.is_main:
                        last_eval = self.evaluate_now(tb)
                    barrier(self.info)
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        seconds = time.perf_counter() - start
        sps = (self.samples - samples0) * self.info.world_size / max(seconds, 1e-9)
        result = TrainResult(str(self.out_dir), str(self.out_dir / "policy"), t.steps, self.last_loss, self.last_accuracy,
                             seconds, sps,
                             self.opt.skipped_total, self.resumed_from, self.info.world_size, last_eval)
        if self.info.is_main:
            write_text_atomic(self.out_dir / "train_result.json", json.dumps(result.to_json(), indent=2))
        return result


def train(cfg: ExperimentConfig, data_path: str | Path | None, out_dir: str | Path, progress: bool = True,
          resume: bool = False, evaluator: Evaluator | None = None) -> TrainResult:
    """Train (or with resume=True continue the run in out_dir from its newest checkpoint) to cfg.train.steps.
    `evaluator`: evaluation in the loop (needed when train.eval_every > 0). With train.processes > 1 the
    training runs in that many new processes (one gloo group) and rank 0's result comes back."""
    if cfg.train.processes > 1 and not in_launched_group():
        return run_local_group(train, (cfg, data_path, out_dir, progress, resume, evaluator), cfg.train.processes,
                               cfg.train.num_threads)
    trainer = Trainer(cfg, data_path, out_dir, progress=progress, resume=resume, evaluator=evaluator)
    try:
        return trainer.run()
    finally:
        shutdown(trainer.info)
