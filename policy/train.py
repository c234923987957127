"""Behaviour cloning: RLDS sequences -> cross-entropy over discretised action tokens.

The loss is averaged over every action token of every valid step (RT-1). Output: a self-contained
policy directory (see policy/policy_dir.py) under RUN_DIR/policy, TensorBoard scalars under RUN_DIR/tb.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from policy.action_tokenizer import ActionTokenizer
from policy.config import ConfigError, ExperimentConfig
from policy.language import TextTokenizer, train_sentencepiece
from policy.policy_dir import InputSpec, save_policy_dir


@dataclass
class TrainResult:
    run_dir: str
    policy_dir: str
    steps: int
    final_loss: float
    final_token_accuracy: float
    seconds: float
    samples_per_second: float

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


def random_shift(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B,T,H,W,C] -> the same frames shifted by up to `pad` pixels (one shift per sequence):
    edge-pad by `pad`, then crop H x W at a random offset."""
    if pad <= 0:
        return images
    b, t, h, w, c = images.shape
    x = images.permute(0, 1, 4, 2, 3).reshape(b, t * c, h, w).float()
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, b), generator=gen)).tolist()
    out = torch.stack([x[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return out.reshape(b, t, c, h, w).permute(0, 1, 3, 4, 2).to(images.dtype)


IMAGE_TOKENIZER = ("backbone", "token_learner", "image_pos")


def init_from_policy(model: torch.nn.Module, policy_dir: str | Path, modules: list[str]) -> int:
    """Copy the tensors of `modules` (top-level PolicyModel children / parameters) from a policy
    directory's weights into `model`; returns how many tensors were copied."""
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
    own = model.state_dict()
    top = {name.split(".")[0] for name in own}
    unknown = [m for m in modules if m not in top]
    if unknown:
        raise ConfigError(f"train.init_modules: expected names from {sorted(top)}, got {unknown}")
    copied = 0
    for name in own:
        if name.split(".")[0] not in modules:
            continue
        if name not in source:
            raise ConfigError(f"train.init_from: {str(weights)!r} has no tensor {name!r} (a different architecture?)")
        if source[name].shape != own[name].shape:
            raise ConfigError(f"train.init_from: tensor {name!r}: expected shape {tuple(own[name].shape)} "
                              f"(this config), got {tuple(source[name].shape)} in {str(weights)!r}")
        own[name] = source[name]
        copied += 1
    model.load_state_dict(own)
    return copied


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  label_sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over [B,T,A,bins] logits at valid steps; returns (loss, per-dimension accuracy)."""
    if label_sigma > 0:
        ce = -(soft_targets(targets, logits.shape[-1], label_sigma) * logits.log_softmax(-1)).sum(-1)
    else:
        ce = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(targets.shape)
    m = mask.unsqueeze(-1).to(ce.dtype)
    denom = m.sum().clamp_min(1.0) * targets.shape[-1]
    loss = (ce * m).sum() / denom
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).to(ce.dtype) * m
        acc = correct.sum(dim=(0, 1)) / m.sum().clamp_min(1.0)
    return loss, acc


def train(cfg: ExperimentConfig, data_path: str | Path, out_dir: str | Path, progress: bool = True) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from datasets.rlds_loader import DataKeys, RLDSDataset, SequenceSpec, TorchBatches, make_sequences
    from policy.model import PolicyModel

    out_dir = Path(out_dir)
    check_writable(out_dir)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    keys = DataKeys(camera=cfg.data.camera, proprio=cfg.data.proprio_key if cfg.model.use_proprio else None,
                    instruction=cfg.data.instruction_key)
    data = RLDSDataset(data_path, keys)
    if data.image_shape[-1] != 3:
        raise ConfigError(f"data.camera {cfg.data.camera!r}: expected RGB frames (H,W,3), the dataset has {data.image_shape}")
    scan = data.scan()
    if cfg.data.sequence == "episode" and scan["max_episode_length"] > cfg.data.sequence_length:
        raise ConfigError(f"data.sequence_length: expected >= the longest episode ({scan['max_episode_length']} steps) "
                          f"so the memory sees whole episodes as at inference, got {cfg.data.sequence_length}")

    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    tok_path = train_sentencepiece(data.instructions, work / "tokenizer.model", cfg.model.language.vocab_size)
    text = TextTokenizer(tok_path, cfg.model.language.max_tokens)
    instr_ids, instr_mask = (torch.from_numpy(a) for a in text.encode(data.instructions))
    low, high = action_bounds(cfg, scan["action_stats"], data.action_dim)
    names = data.sidecar.get("action_names")
    action_tok = ActionTokenizer(low, high, cfg.model.action_bins,
                                 names if names and len(names) == data.action_dim else None)

    model = PolicyModel(cfg.model, vocab_size=text.vocab_size, num_action_dims=data.action_dim,
                        proprio_dim=data.proprio_dim)
    if cfg.train.init_from:
        init_from_policy(model, cfg.train.init_from, list(cfg.train.init_modules))
    frozen = [getattr(model, n) for n in IMAGE_TOKENIZER if getattr(model, n, None) is not None] \
        if cfg.train.freeze_image_tokenizer else []
    for part in frozen:
        for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters()):
            p.requires_grad_(False)
    model.train()
    for part in frozen:
        if isinstance(part, torch.nn.Module):
            part.eval()  # BatchNorm statistics stay those of the source policy
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    seq = make_sequences(data, SequenceSpec(cfg.data.sequence, cfg.data.sequence_length, cfg.model.image.image_size),
                         {s: i for i, s in enumerate(data.instructions)}, shuffle=True, seed=cfg.train.seed,
                         cache=cfg.data.cache_in_memory, shuffle_buffer=cfg.data.shuffle_buffer)
    batches = iter(TorchBatches(seq, cfg.train.batch_size))
    aug_gen = torch.Generator().manual_seed(cfg.train.seed)

    spec = InputSpec(camera_key=cfg.data.camera.split("/")[-1], image_shape=tuple(data.image_shape),
                     proprio_key=cfg.data.proprio_key.split("/")[-1] if cfg.model.use_proprio else None,
                     proprio_dim=data.proprio_dim, action_dim=data.action_dim,
                     env={k: data.sidecar[k] for k in ("env", "camera", "image_size", "tasks") if k in data.sidecar})
    tb = SummaryWriter(str(out_dir / "tb"))
    start = time.perf_counter()
    wait_s = 0.0
    loss_v, acc_v = float("nan"), float("nan")
    samples = 0
    bar = tqdm(range(cfg.train.steps), desc="train", unit="step", disable=not progress)

    def save() -> Path:
        return save_policy_dir(out_dir / "policy", cfg, model, tok_path, action_tok, scan["action_stats"], spec,
                               extra={"trained_steps": step + 1, "dataset": data.dir})

    for step in bar:
        t0 = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t0
        ids = instr_ids[batch["instruction"]]
        context = model.encode_instruction(ids, instr_mask[batch["instruction"]])
        images = random_shift(batch["image"], cfg.data.random_shift, aug_gen)
        logits = model(images, context, batch.get("proprio"), batch["mask"])
        targets = action_tok.tokenize(batch["action"])
        loss, acc = sequence_loss(logits, targets, batch["mask"], cfg.train.label_sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        samples += int(batch["mask"].sum())
        loss_v, acc_v = float(loss.detach()), float(acc.mean())
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            elapsed = time.perf_counter() - start
            tb.add_scalar("train/loss", loss_v, step)
            tb.add_scalar("train/token_accuracy", acc_v, step)
            for i, name in enumerate(action_tok.names):
                tb.add_scalar(f"token_accuracy/{name}", float(acc[i]), step)
            tb.add_scalar("train/lr", sched.get_last_lr()[0], step)
            tb.add_scalar("train/grad_norm", float(grad_norm), step)
            tb.add_scalar("perf/samples_per_second", samples / elapsed, step)
            tb.add_scalar("perf/data_wait_fraction", wait_s / elapsed, step)
            bar.set_postfix(loss=f"{loss_v:.3f}", acc=f"{acc_v:.3f}")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.steps:
            save()
    policy_path = save()
    tb.close()
    seconds = time.perf_counter() - start
    result = TrainResult(str(out_dir), str(policy_path), cfg.train.steps, loss_v, acc_v, seconds, samples / seconds)
    (out_dir / "train_result.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
