"""An untrained policy directory, so the step API, the server and its benchmark work without training.

Weights are the model's seeded initialisation; the instruction tokenizer is trained on the tabletop
suite's instruction templates. Everything else (format, input spec, action tokenizer) is exactly what
`train` writes, so whatever loads it also loads a trained policy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from policy.action_tokenizer import ActionField, ActionTokenizer, DictActionTokenizer
from policy.config import ExperimentConfig, load_config
from policy.language import train_sentencepiece
from policy.policy_dir import InputSpec, save_policy_dir

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
COLORS = ("red", "green", "blue")


class _Slots(dict):
    """Fills any template slot ({obj}, {other}, {pad}, {direction}, ...) with a coloured object: enough
    words for an untrained policy's tokenizer."""

    def __init__(self, color: str):
        super().__init__()
        self.color = color

    def __missing__(self, key: str) -> str:
        return "left" if key == "direction" else f"{self.color} cube"


def tabletop_instructions() -> list[str]:
    import envs

    return sorted({t.format_map(_Slots(c)) for templates in envs.list_tasks("tabletop").values()
                   for t in templates for c in COLORS})


def build_random_policy(out: str | Path, config: str | Path | ExperimentConfig | None = None,
                        overrides: Sequence[str] = (), image_shape: tuple[int, int, int] | None = None,
                        proprio_dim: int = 4, action_fields: Sequence[ActionField] | None = None,
                        seed: int = 0) -> Path:
    """Write an untrained policy dir to `out` for the tabletop suite (its 5-d action and 4-d state).

    image_shape: the camera frames the policy accepts (default: the model's image_size, square); the
    model resizes them. action_fields: an Open X-Embodiment style dict action instead of the vector one.
    """
    import envs
    from common.action_interface import action_interface
    from policy.model import PolicyModel

    cfg = config if isinstance(config, ExperimentConfig) else load_config(config or QUICKSTART, list(overrides))
    size = cfg.model.image.image_size
    image_shape = tuple(int(v) for v in (image_shape or (size, size, 3)))
    if len(image_shape) != 3 or image_shape[2] != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape: expected (H, W, 3) with H, W >= 1, got {image_shape}")
    if not cfg.model.use_proprio:
        proprio_dim = 0  # as `train` writes it: no proprio key, no proprio input
    out = Path(out)
    tok_path = train_sentencepiece(tabletop_instructions(), out.parent / f".{out.name}.tokenizer.model",
                                   cfg.model.language.vocab_size)
    try:
        if action_fields is not None:
            tok: ActionTokenizer | DictActionTokenizer = DictActionTokenizer(action_fields, cfg.model.action_bins,
                                                                       tokenization=cfg.model.action_tokenization)
        else:
            act = action_interface("tabletop")
            tok = ActionTokenizer(list(act.low), list(act.high), cfg.model.action_bins, act.names,
                                  tokenization=cfg.model.action_tokenization)
        torch.manual_seed(seed)
        from policy.language import TextTokenizer

        vocab = TextTokenizer(tok_path, cfg.model.language.max_tokens).vocab_size
        model = PolicyModel(cfg.model, vocab_size=vocab, num_action_dims=tok.num_tokens,
                            proprio_dim=proprio_dim).eval()
        _never_terminate(model, tok.names)
        spec = InputSpec(camera_key=cfg.data.camera.split("/")[-1], image_shape=image_shape,  # type: ignore[arg-type]
                         proprio_key=cfg.data.proprio_key.split("/")[-1] if cfg.model.use_proprio else None,
                         proprio_dim=proprio_dim, action_dim=tok.num_tokens,
                         env={"env": "tabletop", "camera": "front", "image_size": image_shape[0],
                              "tasks": list(envs.list_tasks("tabletop"))})
        stats = {"note": "untrained policy (rollout/random_policy.py): no dataset statistics"}
        return save_policy_dir(out, cfg, model, tok_path, tok, stats, spec, extra={"trained_steps": 0, "untrained": True})
    finally:
        tok_path.unlink(missing_ok=True)


def _never_terminate(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Push the terminate token to its lowest bin: otherwise an untrained policy ends half its episodes
    on the first step, and rollouts through it (tests, benchmarks) would be one step long."""
    head = getattr(model, "head", None)
    bias = getattr(head, "bias", None)
    if "terminate_episode" not in names or not isinstance(bias, torch.nn.Parameter) or bias.dim() != 2:
        return
    with torch.no_grad():
        bias[list(names).index("terminate_episode"), 0] = 20.0
