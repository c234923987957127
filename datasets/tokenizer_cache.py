"""The instruction tokenizer (sentencepiece) for a dataset: a given model file, or one trained on the
dataset's instructions once and cached, keyed by the instruction set and the vocabulary size."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable

from datasets.rlds_loader import user_cache_root


def tokenizer_key(instructions: Iterable[str], vocab_size: int) -> str:
    # The same normalisation train_sentencepiece applies: lists that train the same model share a key.
    sentences = sorted({s.strip().lower() for s in instructions if s and s.strip()})
    return hashlib.sha256(repr((sentences, int(vocab_size))).encode()).hexdigest()[:20]


def sentencepiece_model(instructions: Iterable[str], vocab_size: int, given: str | Path = "",
                        out_path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of the tokenizer model to use; copied to `out_path` when given (the run's own copy).

    `given` (data.sentencepiece_model) is used as is; otherwise the model trained on `instructions` with
    `vocab_size` is taken from the cache, or trained and cached.
    """
    from policy.language import train_sentencepiece

    instructions = list(instructions)
    if given:
        src = Path(given)
        if not src.is_file():
            raise FileNotFoundError(f"data.sentencepiece_model: expected a sentencepiece .model file, "
                                    f"found nothing at {str(src)!r}")
        import sentencepiece as spm

        try:
            spm.SentencePieceProcessor(model_file=str(src))
        except Exception as exc:  # noqa: BLE001  (sentencepiece raises RuntimeError/OSError variants)
            raise ValueError(f"data.sentencepiece_model {str(src)!r}: not a sentencepiece model: {exc}") from None
    else:
        if vocab_size < 4:
            raise ValueError(f"model.language.vocab_size: expected >= 4, got {vocab_size}")
        root = Path(cache_dir) if cache_dir else user_cache_root() / "tokenizers"
        src = root / f"spm-{tokenizer_key(instructions, vocab_size)}.model"
        if not src.is_file():
            train_sentencepiece(instructions, src, vocab_size)  # writes atomically
    if out_path is None:
        return src
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(out)
    return out
