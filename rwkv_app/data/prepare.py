"""Raw inputs -> token files: JSONL (`{"text": ...}` a line), plain text (a file is a document) and NumPy integer
arrays (a row is a document; integer tokenizer only), tokenized, optionally shuffled and repeated with a seed.

Documents are streamed into a temporary file, so memory stays flat whatever the corpus size; shuffling and repeating
then copy documents out of that file in the new order. Nothing replaces the previous dataset until all is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from rwkv_app.data.binidx import BinIdx, TokenWriter, dataset_files, token_dtype
from rwkv_app.data.sampler import magic_prime_or_zero
from rwkv_app.errors import UserError

SOURCE_KINDS = (".jsonl", ".txt", ".npy")


@dataclass
class PrepareSummary:
    """What `prepare_dataset` wrote."""

    files: list[Path]
    documents: int  # source documents (before repeating)
    tokens: int  # tokens written, end-of-document tokens included
    vocab_size: int
    dtype: str
    fmt: str
    repeat: int = 1
    shuffled: bool = False
    ctx_len: Optional[int] = None
    magic_prime: Optional[int] = None  # for ctx_len; 0 when the data is too short for it
    sources: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"wrote {', '.join(str(f) for f in self.files)}",
               f"documents: {self.documents:,}" + (f" x {self.repeat} repeats" if self.repeat > 1 else "")
               + (" (shuffled)" if self.shuffled else ""),
               f"tokens: {self.tokens:,} ({self.dtype}, vocab {self.vocab_size:,}, format {self.fmt})"]
        if self.ctx_len:
            prime = f"{self.magic_prime:,}" if self.magic_prime else "none (too few tokens for this context)"
            out.append(f"magic prime for ctx {self.ctx_len}: {prime}")
        out.append(f"suggested exit tokens (one pass): {self.tokens:,}")
        return out


# --------------------------------------------------------------------------------------------------------- reading


def source_size(path: Path) -> int:
    return path.stat().st_size


def read_documents(path: Union[str, Path]) -> Iterator[tuple[Union[str, np.ndarray], int]]:
    """(document, bytes of the source it covered) pairs: a str, or an integer array for .npy rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset source {path} not found")
    kind = path.suffix.lower()
    if kind == ".jsonl":
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    yield "", len(raw)
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise UserError(f"{path}:{line_no}: invalid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"{path}:{line_no}: expected an object with a string \"text\" field")
                yield record["text"], len(raw)
    elif kind == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})") from None
        yield text, source_size(path)
    elif kind == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable .npy array ({e})") from None
        if array.dtype.kind not in "iu":
            raise UserError(f"{path}: dtype {array.dtype}; expected an integer array")
        if array.ndim not in (1, 2):
            raise UserError(f"{path}: shape {array.shape}; expected [tokens] or [documents, tokens]")
        rows = array[None] if array.ndim == 1 else array
        per_row = max(1, source_size(path) // max(1, len(rows)))
        for row in rows:
            yield np.asarray(row), per_row
    else:
        raise UserError(f"dataset source {path}: unknown kind `{path.suffix}` (expected {', '.join(SOURCE_KINDS)})")


def _encode(tokenizer, document: Union[str, np.ndarray], where: Path) -> list[int]:
    if isinstance(document, str):
        return tokenizer.encode(document)
    if not hasattr(tokenizer, "encode_sequence"):
        raise UserError(f"{where}: NumPy sources hold integers; they need tokenizer = \"integer\"")
    return tokenizer.encode_sequence(document.tolist())


# --------------------------------------------------------------------------------------------------------- writing


def prepare_dataset(sources: Sequence[Union[str, Path]], tokenizer, prefix: Union[str, Path], *,
                    fmt: str = "rwkv_legacy", shuffle: bool = False, repeat: int = 1, seed: int = 42,
                    ctx_len: Optional[int] = None, progress: bool = True) -> PrepareSummary:
    """Tokenize `sources` into PREFIX's files (token 0 after every document); returns a summary.

    `shuffle` permutes the documents (a new permutation per repeat), `repeat` writes the corpus that many times.
    Empty documents are skipped.
    """
    if not sources:
        raise UserError("no dataset sources given (set dataset_sources in the train config)")
    if repeat < 1:
        raise UserError(f"repeat must be at least 1, got {repeat}")
    paths = [Path(s) for s in sources]
    for p in paths:
        if not p.is_file():
            raise UserError(f"dataset source {p} not found")
        if p.suffix.lower() not in SOURCE_KINDS:
            raise UserError(f"dataset source {p}: unknown kind `{p.suffix}` (expected {', '.join(SOURCE_KINDS)})")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size, fmt)
    reorder = shuffle or repeat > 1

    # Pass 1: tokenize in source order, straight into the final files, or into a scratch binidx to reorder from.
    scratch = prefix.with_name(f".{prefix.name}.{os.getpid()}.scratch")
    first = scratch if reorder else prefix
    documents = 0
    bar = _progress(sum(source_size(p) for p in paths), progress)
    try:
        with TokenWriter(first, dtype, "rwkv_legacy" if reorder else fmt) as writer:
            for path in paths:
                for document, nbytes in read_documents(path):
                    ids = _encode(tokenizer, document, path)
                    if ids:
                        writer.add(ids)
                        documents += 1
                    bar.update(nbytes)
        bar.close()
        if documents == 0:
            raise UserError(f"the dataset sources hold no documents: {', '.join(map(str, paths))}")
        tokens = writer.num_tokens
        if reorder:
            tokens = _reorder(scratch, prefix, dtype, fmt, shuffle, repeat, seed, progress)
    finally:
        bar.close()
        for f in dataset_files(scratch, "rwkv_legacy"):
            f.unlink(missing_ok=True)
    prime = magic_prime_or_zero(tokens, ctx_len) if ctx_len else None
    return PrepareSummary(files=dataset_files(prefix, fmt), documents=documents, tokens=tokens,
                          vocab_size=tokenizer.vocab_size, dtype=str(dtype), fmt=fmt, repeat=repeat,
                          shuffled=shuffle, ctx_len=ctx_len, magic_prime=prime, sources=[str(p) for p in paths])


def _reorder(scratch: Path, prefix: Path, dtype: np.dtype, fmt: str, shuffle: bool, repeat: int, seed: int,
             progress: bool) -> int:
    src = BinIdx(scratch)
    starts = np.zeros(src.num_documents + 1, dtype=np.int64)
    np.cumsum(src.sizes, out=starts[1:])
    rng = np.random.default_rng(seed)
    bar = _progress(repeat * src.num_documents, progress, unit="doc", desc="shuffling" if shuffle else "repeating")
    with TokenWriter(prefix, dtype, fmt) as writer:
        for _ in range(repeat):
            order = rng.permutation(src.num_documents) if shuffle else range(src.num_documents)
            for d in order:
                # the scratch documents already end with token 0
                writer.add(src.tokens[starts[d]:starts[d + 1]], end_of_document=False)
                bar.update(1)
    bar.close()
    return writer.num_tokens


def _progress(total: int, enabled: bool, unit: str = "B", desc: str = "tokenizing"):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, leave=False)


# ------------------------------------------------------------------------------------------------ from a config


def tokenizer_from_config(cfg):
    """The tokenizer a TrainConfig names (`tokenizer`, `tokenizer_vocab_path`, `tokenizer_max_value`)."""
    from rwkv_app.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer, cfg.tokenizer_vocab_path, cfg.tokenizer_max_value)


def prepare_from_config(cfg, *, repeat: int = 1, progress: bool = True) -> PrepareSummary:
    """`rwkv-data prepare`: tokenize cfg.dataset_sources into cfg.dataset_prefix in cfg.dataset_format."""
    if not cfg.dataset_sources:
        raise UserError(f"{cfg.source}: no `dataset_sources` to prepare from (list .jsonl, .txt or .npy files)")
    tokenizer = tokenizer_from_config(cfg)
    if tokenizer.vocab_size > cfg.arch.vocab_size:
        raise UserError(f"the {cfg.tokenizer} tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                        f"is {cfg.arch.vocab_size}; raise vocab_size in the model config")
    return prepare_dataset(cfg.dataset_sources, tokenizer, cfg.dataset_prefix, fmt=cfg.dataset_format,
                           shuffle=cfg.shuffle_documents, repeat=repeat, seed=cfg.random_seed,
                           ctx_len=cfg.context_length, progress=progress)


def dataset_ready(cfg) -> bool:
    return all(f.is_file() for f in dataset_files(cfg.dataset_prefix, cfg.dataset_format))
