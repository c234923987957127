"""Instruction text -> token ids with a sentencepiece model trained on the dataset's instructions."""
from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

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
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out_path)
    return out_path


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
