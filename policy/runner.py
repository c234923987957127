"""The step API: load a policy directory, then `reset(instruction)` and `step(observation) -> action`.

Per-episode state (the controller's memory) lives here; the instruction is encoded once per reset.
Every observation is validated against the policy's input spec before it reaches the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from policy.policy_dir import LoadedPolicy, load_policy_dir


class ObservationError(ValueError):
    """An observation that does not match the policy's input spec (names the key, expected, got)."""


class PolicyRunner:
    def __init__(self, policy: LoadedPolicy, device: str | torch.device = "cpu"):
        self.policy = policy
        self.model = policy.model
        self.spec = policy.spec
        self.device = torch.device(device)
        self._context: torch.Tensor | None = None
        self._state: Any = None
        self.instruction: str | None = None
        self.steps = 0

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PolicyRunner":
        return cls(load_policy_dir(path, device), device)

    @property
    def action_names(self) -> tuple[str, ...]:
        return self.policy.action_tokenizer.names

    @torch.inference_mode()
    def reset(self, instruction: str) -> None:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ObservationError(f"instruction: expected a non-empty string, got {instruction!r}")
        ids, mask = self.policy.text_tokenizer.encode([instruction])
        self._context = self.model.encode_instruction(torch.from_numpy(ids).to(self.device),
                                                      torch.from_numpy(mask).to(self.device))
        self._state = self.model.init_state(1)
        self.instruction = instruction
        self.steps = 0

    def validate(self, observation: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        if not isinstance(observation, Mapping):
            raise ObservationError(f"observation: expected a dict, got {type(observation).__name__}")
        key = self.spec.camera_key
        if key not in observation:
            raise ObservationError(f"observation[{key!r}]: missing; expected a uint8 image of shape "
                                   f"{self.spec.image_shape}; got keys {sorted(observation)}")
        img = np.asarray(observation[key])
        if img.dtype != np.uint8 or img.shape != tuple(self.spec.image_shape):
            raise ObservationError(f"observation[{key!r}]: expected uint8 {tuple(self.spec.image_shape)}, "
                                   f"got {img.dtype} {img.shape}")
        proprio = None
        if self.spec.proprio_key:
            pk = self.spec.proprio_key
            if pk not in observation:
                raise ObservationError(f"observation[{pk!r}]: missing; expected float ({self.spec.proprio_dim},); "
                                       f"got keys {sorted(observation)}")
            proprio = np.asarray(observation[pk], dtype=np.float32).reshape(-1)
            if proprio.shape != (self.spec.proprio_dim,) or not np.all(np.isfinite(proprio)):
                raise ObservationError(f"observation[{pk!r}]: expected {self.spec.proprio_dim} finite floats, "
                                       f"got shape {np.shape(observation[pk])} values {proprio[:8].tolist()}")
        return img, proprio

    @torch.inference_mode()
    def step(self, observation: Mapping[str, Any]) -> np.ndarray:
        """One control step: returns the action vector (names in `action_names`)."""
        if self._context is None:
            raise RuntimeError("step() before reset(instruction): call reset with the task instruction first")
        img, proprio = self.validate(observation)
        image = torch.from_numpy(np.array(img)).unsqueeze(0).to(self.device)  # own, writable copy
        prop = torch.from_numpy(proprio).unsqueeze(0).to(self.device) if proprio is not None else None
        logits, self._state = self.model.step(image, self._context, prop, self._state)
        self.steps += 1
        return self.decode(logits[0]).cpu().numpy().astype(np.float32)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., A, bins] logits -> [..., A] actions, as the policy's config says (argmax or expectation)."""
        tok = self.policy.action_tokenizer
        if self.policy.cfg.model.action_decoding == "expectation":
            bins = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            return tok.detokenize((logits.softmax(-1) * bins).sum(-1))
        return tok.detokenize(logits.argmax(-1))

    def named(self, action: np.ndarray) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.action_names, action)}
