"""Token files on disk: RWKV-LM's binidx (`.bin` + `.idx`) and rwkv-rs's single-file `.bin`, memory-mapped.

binidx ("rwkv_legacy"), little-endian. `.idx`: 9-byte magic `MMIDIDX\\x00\\x00`, u64 version 1, u8 dtype code, u64 N
documents, u64 M = N + 1, i32[N] document sizes (in tokens), i64[N] byte offsets into `.bin`, i64[M] doc_idx 0..N.
`.bin`: the documents back to back, each ending with the end-of-document token 0.

rwkv-rs ("rwkv"): one `.bin` = an 89-byte header (`RWKVBIN\\x00`, u64 version 1, u64 tokens, u64 units per token,
u8 dtype code 0 u8 / 1 u16 / 2 f32, 7 x u64 magic primes for ctx 128 ... 8192) followed by the tokens.

Readers never load a file: they map it and hand out slices of the flat token stream.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Union

import numpy as np

from rwkv_app.errors import UserError
from rwkv_app.fileio import atomic_path

IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
IDX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, M
# RWKV-LM's table (codes 6 and 7 are both float64 there); token files use the integer ones.
IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
              8: np.uint16}
IDX_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
             np.dtype(np.int64): 5, np.dtype(np.uint16): 8}

RWKV_MAGIC = b"RWKVBIN\x00"
RWKV_VERSION = 1
RWKV_HEADER = struct.Struct("<8sQQQB7Q")  # 89 bytes
RWKV_DTYPES = {0: np.uint8, 1: np.uint16, 2: np.float32}
RWKV_PRIME_CTX = (128, 256, 512, 1024, 2048, 4096, 8192)

FORMATS = ("rwkv_legacy", "rwkv")
EOD_ID = 0


def token_dtype(vocab_size: int, fmt: str = "rwkv_legacy") -> np.dtype:
    """The narrowest dtype RWKV readers accept for ids 0 .. vocab_size - 1 (u16 for the World vocab)."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if fmt == "rwkv":
        raise UserError(f"vocab of {vocab_size} tokens does not fit the `rwkv` dataset format (u16 ids, at most "
                        f"65536 tokens); use dataset_format = \"rwkv_legacy\"")
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    raise UserError(f"vocab of {vocab_size} tokens does not fit any binidx dtype")


def dataset_files(prefix: Union[str, Path], fmt: str) -> list[Path]:
    prefix = Path(prefix)
    if fmt == "rwkv":
        return [prefix.with_name(prefix.name + ".bin")]
    return [prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")]


# ---------------------------------------------------------------------------------------------------------- reading


class TokenFile:
    """A flat, memory-mapped token stream: `len(f)` tokens, `f.get(offset, length)` -> np.ndarray (a view)."""

    path: Path
    tokens: np.ndarray  # [num_tokens], memory-mapped
    num_documents: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    def get(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or offset + length > len(self):
            raise IndexError(f"tokens {offset}..{offset + length} outside 0..{len(self)} of {self.path}")
        return self.tokens[offset:offset + length]


def _require_files(*paths: Path) -> None:
    for p in paths:
        if not p.is_file():
            raise UserError(f"dataset file {p} not found (run `rwkv-data prepare` or fix dataset_base_path / "
                            f"filename_without_extensions)")


class BinIdx(TokenFile):
    """RWKV-LM binidx: PREFIX.bin + PREFIX.idx."""

    def __init__(self, prefix: Union[str, Path]):
        bin_path, idx_path = dataset_files(prefix, "rwkv_legacy")
        self.path = bin_path
        _require_files(bin_path, idx_path)
        size = idx_path.stat().st_size
        if size < IDX_HEADER.size:
            raise UserError(f"{idx_path}: corrupt index ({size} bytes is shorter than the header)")
        with open(idx_path, "rb") as f:
            magic, version, code, n, m = IDX_HEADER.unpack(f.read(IDX_HEADER.size))
        if magic != IDX_MAGIC:
            raise UserError(f"{idx_path}: not a binidx index (magic {magic!r}, expected {IDX_MAGIC!r})")
        if version != IDX_VERSION:
            raise UserError(f"{idx_path}: binidx version {version} is not supported (expected {IDX_VERSION})")
        if code not in IDX_DTYPES:
            raise UserError(f"{idx_path}: unknown dtype code {code}")
        dtype = np.dtype(IDX_DTYPES[code])
        if dtype.kind == "f":
            raise UserError(f"{idx_path}: dtype {dtype} holds no token ids")
        expected = IDX_HEADER.size + 4 * n + 8 * n + 8 * m
        if size != expected:
            raise UserError(f"{idx_path}: corrupt index ({size} bytes, its header implies {expected})")
        self.sizes = np.memmap(idx_path, dtype=np.int32, mode="r", offset=IDX_HEADER.size, shape=(n,)) if n else \
            np.zeros(0, np.int32)
        self.num_documents = int(n)
        total = int(self.sizes.sum(dtype=np.int64))
        if bin_path.stat().st_size != total * dtype.itemsize:
            raise UserError(f"{bin_path}: {bin_path.stat().st_size} bytes, but {idx_path.name} lists {total} tokens "
                            f"of {dtype} ({total * dtype.itemsize} bytes): the pair is corrupt or mismatched")
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(total,)) if total else np.zeros(0, dtype)


class RwkvBin(TokenFile):
    """rwkv-rs's single-file format: PREFIX.bin with an 89-byte header."""

    def __init__(self, prefix: Union[str, Path]):
        (bin_path,) = dataset_files(prefix, "rwkv")
        self.path = bin_path
        _require_files(bin_path)
        size = bin_path.stat().st_size
        if size < RWKV_HEADER.size:
            raise UserError(f"{bin_path}: corrupt (shorter than the {RWKV_HEADER.size}-byte rwkv header)")
        with open(bin_path, "rb") as f:
            magic, version, n, units, code, *primes = RWKV_HEADER.unpack(f.read(RWKV_HEADER.size))
        if magic != RWKV_MAGIC:
            raise UserError(f"{bin_path}: not an rwkv-rs dataset (magic {magic!r}); for binidx set "
                            f"dataset_format = \"rwkv_legacy\"")
        if version != RWKV_VERSION:
            raise UserError(f"{bin_path}: rwkv dataset version {version} is not supported (expected {RWKV_VERSION})")
        if code not in RWKV_DTYPES or RWKV_DTYPES[code] is np.float32:
            raise UserError(f"{bin_path}: dtype code {code} holds no token ids (expected 0 = u8 or 1 = u16)")
        if units != 1:
            raise UserError(f"{bin_path}: {units} units per token; only plain token streams (1) are supported")
        dtype = np.dtype(RWKV_DTYPES[code])
        if size != RWKV_HEADER.size + n * dtype.itemsize:
            raise UserError(f"{bin_path}: corrupt ({size} bytes, its header implies "
                            f"{RWKV_HEADER.size + n * dtype.itemsize})")
        self.stored_primes = dict(zip(RWKV_PRIME_CTX, primes))
        self.num_documents = 0  # the format does not record document boundaries
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r", offset=RWKV_HEADER.size, shape=(n,)) if n else \
            np.zeros(0, dtype)


def open_tokens(prefix: Union[str, Path], fmt: str = "rwkv_legacy") -> TokenFile:
    """The dataset at PREFIX in `fmt` ("rwkv_legacy" = binidx, "rwkv" = rwkv-rs), memory-mapped."""
    if fmt == "rwkv_legacy":
        return BinIdx(prefix)
    if fmt == "rwkv":
        return RwkvBin(prefix)
    raise UserError(f"unknown dataset format `{fmt}` (expected one of {', '.join(FORMATS)})")


# ---------------------------------------------------------------------------------------------------------- writing


class TokenWriter:
    """Streams documents into PREFIX's files; `close()` writes the index and moves both into place atomically.

    Use as a context manager: an exception leaves the previous files untouched and no partial ones behind.
    """

    def __init__(self, prefix: Union[str, Path], dtype: np.dtype, fmt: str = "rwkv_legacy"):
        if fmt not in FORMATS:
            raise UserError(f"unknown dataset format `{fmt}` (expected one of {', '.join(FORMATS)})")
        self.fmt = fmt
        self.dtype = np.dtype(dtype)
        if fmt == "rwkv" and self.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise UserError(f"the `rwkv` dataset format stores u8 or u16 ids, not {self.dtype}")
        if fmt == "rwkv_legacy" and self.dtype not in IDX_CODES:
            raise UserError(f"binidx cannot store {self.dtype} token ids")
        self.files = dataset_files(prefix, fmt)
        self.sizes: list[int] = []
        self.num_tokens = 0
        self._bin_ctx = atomic_path(self.files[0])
        self._bin_tmp = self._bin_ctx.__enter__()
        self._bin: BinaryIO = open(self._bin_tmp, "wb")
        if fmt == "rwkv":
            self._bin.write(b"\x00" * RWKV_HEADER.size)  # filled in by close()
        self._closed = False

    def add(self, ids: Union[np.ndarray, Iterable[int]], end_of_document: bool = True) -> None:
        """Append one document; token 0 is appended unless `end_of_document=False`."""
        array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if end_of_document:
            array = np.append(array, EOD_ID)
        if array.size == 0:
            return
        limit = np.iinfo(self.dtype).max
        if array.min() < 0 or array.max() > limit:
            bad = int(array.max() if array.max() > limit else array.min())
            raise UserError(f"token id {bad} does not fit the dataset dtype {self.dtype} (0..{limit})")
        self._bin.write(array.astype(self.dtype).tobytes())
        self.sizes.append(int(array.size))
        self.num_tokens += int(array.size)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.fmt == "rwkv":
                from rwkv_app.data.sampler import magic_prime_or_zero

                primes = [magic_prime_or_zero(self.num_tokens, c) for c in RWKV_PRIME_CTX]
                self._bin.seek(0)
                self._bin.write(RWKV_HEADER.pack(RWKV_MAGIC, RWKV_VERSION, self.num_tokens, 1,
                                                 {1: 0, 2: 1}[self.dtype.itemsize], *primes))
            else:
                # Both files are complete before either is renamed; a crash between the two renames leaves a
                # pair whose sizes disagree, which the reader refuses.
                with atomic_path(self.files[1]) as idx_tmp:
                    _write_idx(idx_tmp, self.sizes, self.dtype)
                    self._finish_bin()
                return
            self._finish_bin()
        except BaseException as e:
            self.abort(e)
            raise

    def _finish_bin(self) -> None:
        self._bin.close()
        self._bin_ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop everything written so far; the previous files (if any) stay as they were."""
        self._closed = True
        if not self._bin.closed:
            self._bin.close()
        exc = exc or RuntimeError("aborted")
        try:
            self._bin_ctx.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def _write_idx(path: Path, sizes: list[int], dtype: np.dtype) -> None:
    n = len(sizes)
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(sizes_arr[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(IDX_HEADER.pack(IDX_MAGIC, IDX_VERSION, IDX_CODES[dtype], n, n + 1))
        f.write(sizes_arr.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_tokens(prefix: Union[str, Path], documents: Iterable[Iterable[int]], dtype=np.uint16,
                 fmt: str = "rwkv_legacy") -> int:
    """Write whole documents (token 0 appended to each); returns the number of tokens written."""
    with TokenWriter(prefix, np.dtype(dtype), fmt) as w:
        for doc in documents:
            w.add(doc)
    return w.num_tokens
