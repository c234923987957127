"""One optimizer step: gradient accumulation, bf16 autocast, clipping, the NaN/Inf guard, EMA, timings.

Kept apart from policy/train.py (setup, data, checkpoints, logging) so that `bench train` times
exactly the step that training runs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from policy.distributed import DistInfo, any_rank


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says why and what to try."""


class EMA:
    """Exponential moving average of the floating-point parameters; buffers (BatchNorm statistics)
    are copied from the live model, as they are averages already."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = {k for k, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self._params and v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state: expected the model's tensors, differs in {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)


@dataclass
class StepStats:
    loss: float  # mean over the step's valid action tokens (this rank); NaN on a skipped step
    accuracy: torch.Tensor  # [A] per action dimension
    grad_norm: float
    skipped: bool
    samples: int  # valid steps (frames) consumed by this rank
    forward_s: float
    backward_s: float
    optimizer_s: float


# loss_fn(micro_batch) -> (loss averaged over the micro-batch's valid tokens, per-dim accuracy, valid count)
LossFn = Callable[[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def autocast_context(device: torch.device, mode: str):
    """train.autocast: 'auto' = bf16 on cuda only; 'bf16' = also on CPU (explicitly asked); 'off'."""
    on = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


class Optimization:
    def __init__(self, raw_model: torch.nn.Module, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, grad_clip: float, autocast: str, info: DistInfo, ema: EMA | None,
                 max_bad_steps: int):
        self.raw_model, self.wrapped = raw_model, wrapped
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip, self.autocast, self.info, self.ema = grad_clip, autocast, info, ema
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0
        self.skipped_total = 0

    def _sync(self) -> None:
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)

    def step(self, micro_batches: list[dict], loss_fn: LossFn, step: int) -> StepStats:
        """Accumulate gradients over `micro_batches`, weighting each by its share of valid tokens (so that
        accumulation equals one big batch), then clip and update unless the loss or gradient is not finite."""
        # a micro-batch's share: its valid steps, or its summed loss weights where the batch carries them
        counts = [float(b["loss_weight"].sum() if "loss_weight" in b else b["mask"].sum()) for b in micro_batches]
        total = max(sum(counts), 1e-12)
        valid = int(sum(float(b["mask"].sum()) for b in micro_batches))
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # A skipped step must leave no trace: its forward passes updated BatchNorm statistics (maybe with NaN).
        buffers = [b.detach().clone() for b in self.raw_model.buffers()]
        self.optimizer.zero_grad(set_to_none=True)
        fwd = bwd = 0.0
        loss_sum, acc_sum = 0.0, None
        for i, (batch, n) in enumerate(zip(micro_batches, counts)):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                t0 = time.perf_counter()
                with autocast_context(self.info.device, self.autocast):
                    loss, acc, _ = loss_fn(batch)
                self._sync()
                t1 = time.perf_counter()
                (loss.float() * (n / total)).backward()
                self._sync()
                fwd += t1 - t0
                bwd += time.perf_counter() - t1
            loss_sum += float(loss.detach()) * n / total
            acc_sum = acc.detach().float() * n / total if acc_sum is None else acc_sum + acc.detach().float() * n / total
        t2 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        # Gradients are identical on every rank after DDP's all-reduce, the loss is not: agree first.
        bad = any_rank(not (torch.isfinite(grad_norm).item() and abs(loss_sum) != float("inf")
                            and loss_sum == loss_sum), self.info)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(self.raw_model.buffers(), buffers):
                    b.copy_(saved)
            self.bad_in_a_row += 1
            self.skipped_total += 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise TrainingError(
                    f"training stopped at step {step + 1}: the loss or gradient norm was NaN/Inf for "
                    f"{self.bad_in_a_row} steps in a row (train.max_bad_steps = {self.max_bad_steps}); "
                    f"{self.skipped_total} steps skipped in all. Try a lower train.lr, a smaller "
                    "train.grad_clip, train.autocast=off, or check the dataset for NaN actions/observations")
        else:
            self.optimizer.step()
            self.bad_in_a_row = 0
            if self.ema is not None:
                self.ema.update(self.raw_model)
        self.scheduler.step()  # the schedule is a function of the step index, skipped or not
        self._sync()
        opt_s = time.perf_counter() - t2
        return StepStats(loss_sum if not bad else float("nan"), acc_sum, float(grad_norm), bad, valid,
                         fwd, bwd, opt_s)
