"""Instruction text -> token ids with a sentencepiece model trained on the dataset's instructions.

One home for the instruction tokenizer: `train_sentencepiece` trains a model, `sentencepiece_model` picks
the one a run uses (a given file, or one trained on the dataset's instructions once and cached, keyed by the
instruction set and the vocabulary size), `TextTokenizer` encodes with it.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from common.atomic import copy_file_atomic, write_bytes_atomic

PAD_ID = 0


def train_sentencepiece(instructions: Iterable[str], out_path: str | Path, vocab_size: int) -> Path:
    """Train a BPE model on the instructions and write it atomically to `out_path` (.model)."""
    sentences = sorted({s.strip().lower() for s in instructions if s and s.strip()})
    if not sentences:
        raise ValueError("instructions: expected at least one non-empty instruction to train the tokenizer, got none")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,  # a handful of templated instructions has fewer pieces than vocab_size
        character_coverage=1.0,
        pad_id=PAD_ID, unk_id=1, bos_id=-1, eos_id=2,
        minloglevel=2,
    )
    write_bytes_atomic(out_path, model.getvalue())
    return out_path


def tokenizer_key(instructions: Iterable[str], vocab_size: int) -> str:
    # The same normalisation train_sentencepiece applies: lists that train the same model share a key.
    sentences = sorted({s.strip().lower() for s in instructions if s and s.strip()})
    return hashlib.sha256(repr((sentences, int(vocab_size))).encode()).hexdigest()[:20]


def sentencepiece_model(instructions: Iterable[str], vocab_size: int, given: str | Path = "",
                        out_path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of the tokenizer model to use; copied to `out_path` when given (the run's own copy).

    `given` (data.sentencepiece_model) is used as is; otherwise the model trained on `instructions` with
    `vocab_size` is taken from the cache (`cache_dir`, default the user cache's tokenizers/), or trained
    and cached.
    """
    instructions = list(instructions)
    if given:
        src = Path(given)
        if not src.is_file():
            raise FileNotFoundError(f"data.sentencepiece_model: expected a sentencepiece .model file, "
                                    f"found nothing at {str(src)!r}")
        try:
            spm.SentencePieceProcessor(model_file=str(src))
        except Exception as exc:  # noqa: BLE001  (sentencepiece raises RuntimeError/OSError variants)
            raise ValueError(f"data.sentencepiece_model {str(src)!r}: not a sentencepiece model: {exc}") from None
    else:
        if vocab_size < 4:
            raise ValueError(f"model.language.vocab_size: expected >= 4, got {vocab_size}")
        if cache_dir:
            root = Path(cache_dir)
        else:
            from datasets.source import user_cache_root  # imports TensorFlow: only when the cache is used

            root = user_cache_root() / "tokenizers"
        src = root / f"spm-{tokenizer_key(instructions, vocab_size)}.model"
        if not src.is_file():
            train_sentencepiece(instructions, src, vocab_size)  # writes atomically
    if out_path is None:
        return src
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return copy_file_atomic(src, out)


class TextTokenizer:
    """Encodes instructions to fixed-length id arrays plus a mask of real tokens."""

    def __init__(self, model_path: str | Path, max_tokens: int):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model: expected a sentencepiece .model file at {str(path)!r}, found nothing")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.max_tokens = max_tokens
        self._truncated: set[str] = set()  # instructions already warned about

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), self.max_tokens), PAD_ID, dtype=np.int64)
        for i, text in enumerate(texts):
            pieces = self.sp.encode(str(text).strip().lower())
            if len(pieces) > self.max_tokens - 1:
                self._warn_truncated(str(text), len(pieces))
            pieces = pieces[: self.max_tokens - 1] + [self.sp.eos_id()]
            ids[i, : len(pieces)] = pieces
        return ids, ids != PAD_ID

    def longest(self, texts: Sequence[str]) -> tuple[int, str]:
        """(pieces, text) of the longest text, without the end token."""
        return max(((len(self.sp.encode(str(t).strip().lower())), str(t)) for t in texts), default=(0, ""))

    def check_fits(self, texts: Sequence[str]) -> None:
        """Training refuses instructions longer than max_tokens: cutting them silently dropped the words
        that name the target (they come last in most templates)."""
        n, text = self.longest(texts)
        if n + 1 > self.max_tokens:
            from policy.config import ConfigError

            raise ConfigError(f"model.language.max_tokens: expected >= {n + 1} (the longest instruction, {text!r}, "
                              f"is {n} tokens plus the end token), got {self.max_tokens}; raise it, or raise "
                              "model.language.vocab_size so that words become single tokens")

    def _warn_truncated(self, text: str, n: int) -> None:
        # Training refuses instructions that do not fit (check_fits); at run time a longer, new one is cut
        # and the policy reads only its start, so say so (once per instruction).
        if text not in self._truncated:
            self._truncated.add(text)
            warnings.warn(f"instruction {text[:60]!r}...: {n} tokens, the policy reads the first "
                          f"{self.max_tokens - 1} (model.language.max_tokens={self.max_tokens} with the end token); "
                          "the rest is ignored", stacklevel=3)
