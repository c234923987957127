"""The step API: load a policy directory, then `reset(instruction)` and `step(observation) -> action`.

Per-episode state (the controller's memory, the RT-1 window) lives here; the instruction is encoded
once per reset. Every observation is validated against the policy's input spec before it reaches the
model. A runner steps one robot (`reset` / `step`) or a batch of robots whose episodes start together
(`reset_batch` / `step_batch`); robots on their own schedules each get a runner (`fork` shares the
weights, not the state).

No step returns a non-finite action: logits or actions holding NaN or inf raise NonFiniteActionError
(naming the robots, the action entries and the cause) and end the episode, whose memory may hold them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from policy.action_tokenizer import DictActionTokenizer
from policy.config import ConfigError
from policy.controllers import controller_info, controller_names
from policy.policy_dir import LoadedPolicy, PolicyDirError, describe_non_finite, load_policy_dir, non_finite_tensors
from policy.threads import RUNTIME_THREADS, set_runtime_threads

EMBEDDING_DIM = 512  # precomputed instruction embeddings (OXE's Universal Sentence Encoder)


class ObservationError(ValueError):
    """An observation that does not match the policy's input spec (names the key, expected, got)."""


class NonFiniteActionError(RuntimeError):
    """A step whose logits or decoded actions hold NaN or inf: raised instead of returning the action.
    Names the robot(s), the action entries, NaN or inf, and where it came from (non-finite weights, or
    activations that overflowed with finite weights). The runner's episode is over: reset to go on."""


class PolicyRunner:
    def __init__(self, policy: LoadedPolicy, device: str | torch.device = "cpu", record_attention: bool = False):
        self.policy = policy
        self.model = policy.model
        self.spec = policy.spec
        self.device = torch.device(device)
        kind = policy.cfg.model.controller.type
        if record_attention and not controller_info(kind).attention_maps:
            kinds = " or ".join(repr(n) for n in controller_names(attention_maps=True))
            raise ValueError(f"record_attention: expected a TTM policy (model.controller.type {kinds}), got {kind!r}")
        self.record_attention = record_attention
        # Per step of the current episode: {"read": [B,r,m+N], "write": [B,m,m+N+r]} (numpy), if recorded.
        self.attention: list[dict[str, np.ndarray]] = []
        self._context: torch.Tensor | None = None
        self._state: Any = None
        self.batch_size = 0
        self.instructions: list[str] = []
        self.steps = 0

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", record_attention: bool = False,
             threads: int | None = RUNTIME_THREADS) -> "PolicyRunner":
        """`threads`: torch intra-op threads for stepping (policy/threads.py: one thread degrades gracefully
        on a loaded machine); None leaves torch's setting alone (callers that choose their own)."""
        if threads is not None:
            set_runtime_threads(threads)
        try:
            policy = load_policy_dir(path, device)
        except (ConfigError, KeyError, TypeError) as exc:
            # A config key or a policy.json field this version does not know: written by another version.
            raise PolicyDirError(f"--policy {str(path)!r}: incompatible policy directory (written by another version "
                                 f"of this stack?): {exc}") from None
        return cls(policy, device, record_attention)

    def fork(self, record_attention: bool | None = None) -> "PolicyRunner":
        """A runner with the same weights and its own episode state (one per robot or session)."""
        rec = self.record_attention if record_attention is None else record_attention
        return PolicyRunner(self.policy, self.device, rec)

    # ---- names ---------------------------------------------------------------------------------
    @property
    def action_names(self) -> tuple[str, ...]:
        """Names of the flat action vector's entries, in order."""
        return self.policy.action_tokenizer.names

    @property
    def instruction(self) -> str | None:
        return self.instructions[0] if self.instructions else None

    @property
    def uses_embedding(self) -> bool:
        return self.policy.cfg.model.language.source == "embedding"

    # ---- episodes ------------------------------------------------------------------------------
    def reset(self, instruction: str, embedding: np.ndarray | Sequence[float] | None = None) -> None:
        """Start one robot's episode. `embedding`: the instruction's precomputed 512-d embedding, required
        (and only accepted) when the policy's model.language.source is 'embedding'. A reset that fails
        ends the previous episode all the same (step() raises until a reset succeeds)."""
        self.reset_batch([instruction], None if embedding is None else [embedding])

    def end_episode(self) -> None:
        """Drop the episode state: step() raises until the next successful reset."""
        self._context, self._state = None, None
        self.batch_size, self.instructions, self.attention, self.steps = 0, [], [], 0

    def reset_batch(self, instructions: Sequence[str],
                    embeddings: Sequence[np.ndarray | Sequence[float]] | np.ndarray | None = None) -> None:
        """Start a batch of episodes together, one instruction per robot; state is per robot. If it fails
        the previous episode is over anyway: a caller that ignores the error must not step on with the
        old memory and instruction."""
        try:
            self._reset_batch(instructions, embeddings)
        except BaseException:
            self.end_episode()
            raise

    @torch.inference_mode()
    def _reset_batch(self, instructions: Sequence[str],
                     embeddings: Sequence[np.ndarray | Sequence[float]] | np.ndarray | None) -> None:
        if isinstance(instructions, str) or not isinstance(instructions, Sequence) or not instructions:
            raise ObservationError(f"instructions: expected a non-empty list of strings, got {instructions!r}")
        for i, text in enumerate(instructions):
            if not isinstance(text, str) or not text.strip():
                raise ObservationError(f"instruction[{i}]: expected a non-empty string, got {text!r}")
        b = len(instructions)
        if self.uses_embedding:
            self._context = self.model.encode_embedding(self._embeddings(embeddings, b).to(self.device))
        else:
            if embeddings is not None:
                raise ObservationError("embedding: this policy encodes the instruction text "
                                       "(model.language.source 'sentencepiece'); expected None, got an embedding")
            ids, mask = self.policy.text_tokenizer.encode(list(instructions))
            self._context = self.model.encode_instruction(torch.from_numpy(ids).to(self.device),
                                                          torch.from_numpy(mask).to(self.device))
        self._state = self.model.init_state(b)
        self.batch_size = b
        self.instructions = list(instructions)
        self.attention = []
        self.steps = 0

    def _embeddings(self, embeddings: Any, b: int) -> torch.Tensor:
        expected = f"{b} float arrays of shape ({EMBEDDING_DIM},) (model.language.source is 'embedding')"
        if embeddings is None:
            raise ObservationError(f"embedding: expected {expected}, got None")
        try:
            arr = np.asarray(embeddings, dtype=np.float32)
        except (TypeError, ValueError):
            raise ObservationError(f"embedding: expected {expected}, got {type(embeddings).__name__}") from None
        if arr.shape != (b, EMBEDDING_DIM):
            raise ObservationError(f"embedding: expected {expected}, got shape {arr.shape[1:] if arr.ndim else ()}"
                                   f" x {arr.shape[0] if arr.ndim else 0}")
        if not np.all(np.isfinite(arr)):
            raise ObservationError("embedding: expected finite values, got NaN or Inf")
        return torch.from_numpy(arr)

    # ---- observations --------------------------------------------------------------------------
    def validate(self, observation: Mapping[str, Any], where: str = "observation") -> tuple[np.ndarray, np.ndarray | None]:
        """Check one robot's observation against the input spec -> (image uint8 [H,W,3], proprio float32 | None).
        Extra keys (e.g. the instruction) are ignored."""
        if not isinstance(observation, Mapping):
            raise ObservationError(f"{where}: expected a dict, got {type(observation).__name__}")
        key = self.spec.camera_key
        shape = tuple(self.spec.image_shape)
        if key not in observation:
            raise ObservationError(f"{where}[{key!r}]: missing; expected a uint8 image of shape {shape}; "
                                   f"got keys {sorted(map(str, observation))}")
        img = np.asarray(observation[key])
        if img.dtype != np.uint8 or img.shape != shape:
            raise ObservationError(f"{where}[{key!r}]: expected uint8 {shape}, got {img.dtype} {img.shape}")
        proprio = None
        if self.spec.proprio_key:
            pk, n = self.spec.proprio_key, self.spec.proprio_dim
            if pk not in observation:
                raise ObservationError(f"{where}[{pk!r}]: missing; expected float ({n},); "
                                       f"got keys {sorted(map(str, observation))}")
            raw = np.asarray(observation[pk])
            if raw.dtype.kind not in "fiu" or raw.shape not in ((n,), (1, n)):
                raise ObservationError(f"{where}[{pk!r}]: expected float ({n},), got {raw.dtype} {raw.shape}")
            proprio = raw.astype(np.float32).reshape(n)
            if not np.all(np.isfinite(proprio)):
                raise ObservationError(f"{where}[{pk!r}]: expected finite values, got {proprio.tolist()}")
        return img, proprio

    # ---- steps ---------------------------------------------------------------------------------
    def step(self, observation: Mapping[str, Any]) -> np.ndarray:
        """One control step of one robot: the flat float32 action vector (names in `action_names`)."""
        if self._context is not None and self.batch_size != 1:
            raise RuntimeError(f"step(): this runner was reset for a batch of {self.batch_size} robots; "
                               "use step_batch")
        return self.step_batch([observation])[0]

    def step_named(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """One control step with named fields: {name: float} for a vector action, or the dict action
        ({field: float32 array, one-hot int32 for discrete fields}) for an Open X-Embodiment policy."""
        return self.named(self.step(observation))

    @torch.inference_mode()
    def step_batch(self, observations: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """One control step of every robot of the batch: float32 [B, A]."""
        if self._context is None:
            raise RuntimeError("step() before reset(instruction): call reset with the task instruction first")
        if isinstance(observations, Mapping) or len(observations) != self.batch_size:
            got = "a dict" if isinstance(observations, Mapping) else f"{len(observations)}"
            raise ObservationError(f"observations: expected a list of {self.batch_size} observations (one per robot "
                                   f"reset), got {got}")
        checked = [self.validate(o, f"observation[{i}]" if self.batch_size > 1 else "observation")
                   for i, o in enumerate(observations)]
        image = torch.from_numpy(np.stack([c[0] for c in checked])).to(self.device)  # own, writable copy
        prop = (torch.from_numpy(np.stack([c[1] for c in checked])).to(self.device)
                if self.spec.proprio_key else None)
        attn = None
        if self.record_attention:
            logits, state, attn = self.model.step(image, self._context, prop, self._state, return_attention=True)
        else:
            logits, state = self.model.step(image, self._context, prop, self._state)
        actions = self.decode(logits)
        bad = self._non_finite_rows(logits, actions)
        if bad:
            message = self._non_finite_message(logits, actions, bad,
                                               [f"robot {j}" if self.batch_size > 1 else "the robot" for j in bad])
            self.end_episode()  # the new memory may hold the NaN: stepping on from either state is undefined
            raise NonFiniteActionError(message)
        self._state = state
        if attn is not None:
            self.attention.append({k: v.float().cpu().numpy() for k, v in attn.items()})
        self.steps += 1
        return actions.cpu().numpy().astype(np.float32)

    @staticmethod
    @torch.inference_mode()
    def step_group(runners: Sequence["PolicyRunner"], observations: Sequence[Mapping[str, Any]]
                   ) -> list[np.ndarray | Exception]:
        """One step of several single-robot runners (e.g. a server's sessions) in as few batched model
        calls as their states allow; each runner keeps its own state. Per runner: its action, or the
        exception its observation raised (the others still step). Runners whose states cannot be stacked
        (different policies or state shapes, attention recording, non-tensor states) step one by one."""
        if len(runners) != len(observations):
            raise ValueError(f"observations: expected one per runner ({len(runners)}), got {len(observations)}")
        out: list[np.ndarray | Exception | None] = [None] * len(runners)
        groups: dict[tuple, list[tuple[int, np.ndarray, np.ndarray | None]]] = {}
        for i, (r, o) in enumerate(zip(runners, observations)):
            try:
                if r._context is None:
                    raise RuntimeError("step() before reset(instruction): call reset with the task instruction first")
                if r.batch_size != 1:
                    raise RuntimeError(f"step_group: expected single-robot runners, got a batch of {r.batch_size}")
                img, prop = r.validate(o)
            except (ObservationError, RuntimeError) as exc:
                out[i] = exc
                continue
            stackable = isinstance(r._state, torch.Tensor) and not r.record_attention
            key = (id(r.policy), tuple(r._state.shape) if stackable else ("solo", i))
            groups.setdefault(key, []).append((i, img, prop))
        for members in groups.values():
            if len(members) == 1:
                i, img, prop = members[0]
                obs = {runners[i].spec.camera_key: img}
                if prop is not None:
                    obs[runners[i].spec.proprio_key] = prop  # type: ignore[index]
                try:
                    out[i] = runners[i].step(obs)
                except Exception as exc:  # handed back to this runner's caller only
                    out[i] = exc
                continue
            rs = [runners[i] for i, _, _ in members]
            first = rs[0]
            image = torch.from_numpy(np.stack([img for _, img, _ in members])).to(first.device)
            prop = (torch.from_numpy(np.stack([p for _, _, p in members])).to(first.device)
                    if first.spec.proprio_key else None)
            context = torch.cat([r._context for r in rs])  # type: ignore[misc]
            logits, state = first.model.step(image, context, prop, torch.cat([r._state for r in rs]))
            decoded = first.decode(logits)
            bad = set(first._non_finite_rows(logits, decoded))
            actions = decoded.cpu().numpy().astype(np.float32)
            for j, (r, (i, _, _)) in enumerate(zip(rs, members)):
                if j in bad:  # this runner only: the others' rows are finite and step on
                    out[i] = NonFiniteActionError(first._non_finite_message(logits, decoded, [j], ["the robot"]))
                    r.end_episode()
                    continue
                r._state = state[j:j + 1].clone()  # its own storage: no runner holds a view of another's
                r.steps += 1
                out[i] = actions[j]
        return out  # type: ignore[return-value]

    # ---- non-finite outputs ------------------------------------------------------------------
    @staticmethod
    def _non_finite_rows(logits: torch.Tensor, actions: torch.Tensor) -> list[int]:
        """Robots (rows) whose logits or actions are not all finite. Logits count too: argmax picks a NaN
        logit's bin as if it won, giving a finite but meaningless action."""
        ok = torch.isfinite(logits).flatten(1).all(1) & torch.isfinite(actions).flatten(1).all(1)
        return [] if bool(ok.all()) else (~ok).nonzero().flatten().tolist()

    def _non_finite_message(self, logits: torch.Tensor, actions: torch.Tensor, rows: list[int],
                            who: list[str]) -> str:
        names = self.action_names
        parts = []
        for j, label in zip(rows, who):
            lg, act = logits[j], actions[j]
            entries = (~torch.isfinite(lg)).flatten(1).any(1) | ~torch.isfinite(act)  # per action entry
            bad_names = [names[k] if k < len(names) else str(k) for k in entries.nonzero().flatten().tolist()]
            kinds = []
            if bool(torch.isnan(lg).any()) or bool(torch.isnan(act).any()):
                kinds.append("NaN")
            if bool(torch.isinf(lg).any()) or bool(torch.isinf(act).any()):
                kinds.append("inf")
            source = ("from non-finite logits" if not bool(torch.isfinite(lg).all())
                      else "from decoding finite logits (action_stats.json bounds?)")
            shown = ", ".join(bad_names[:6]) + (", ..." if len(bad_names) > 6 else "")
            parts.append(f"{label}: {' and '.join(kinds)} in {len(bad_names)} of {len(names)} action entries "
                         f"({shown}) {source}")
        weights = non_finite_tensors(self.model)
        if weights:
            # loading refuses such weights: these changed in memory since
            cause = f"the weights hold NaN or inf: {describe_non_finite(weights)}"
        else:
            cause = ("the weights are finite: activations overflowed (an observation far outside the training "
                     "data, or weights near the float limit)")
        return (f"step: refusing a non-finite action for {'; '.join(parts)}; cause: {cause}; the episode is "
                "over: reset to start another")

    # ---- actions -------------------------------------------------------------------------------
    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., A, bins] logits -> [..., A] flat actions, as the policy's config says (argmax or expectation).
        Dict actions are flattened in the tokenizer's field order (`action_names`), a discrete field as
        its class index."""
        tok = self.policy.action_tokenizer
        if self.policy.cfg.model.action_decoding == "expectation":
            bins = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            tokens = (logits.softmax(-1) * bins).sum(-1)
        else:
            tokens = logits.argmax(-1)
        if isinstance(tok, DictActionTokenizer):
            return tok.flatten(tok.detokenize(tokens))
        return tok.detokenize(tokens)

    def named(self, action: np.ndarray) -> dict[str, Any]:
        """Flat action [A] -> named fields (see step_named)."""
        tok = self.policy.action_tokenizer
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (len(self.action_names),):
            raise ValueError(f"action: expected shape ({len(self.action_names)},), got {action.shape}")
        if isinstance(tok, DictActionTokenizer):
            return {k: v.numpy() for k, v in tok.unflatten(torch.from_numpy(action)).items()}
        return {n: float(v) for n, v in zip(self.action_names, action)}
