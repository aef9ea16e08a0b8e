"""Tokenizers: text <-> token ids for training data and serving.

Byte tokenizers (`WorldTokenizer`, `GenericTokenizer`) read a vocab file in the RWKV World format, one token a line:
`<id> <python str or bytes literal> <byte length>`, e.g. `261 '\\n\\n' 2` or `250 b'\\xf9' 1`. Encoding is greedy
longest byte match over the UTF-8 text; decoding joins the token bytes and decodes them with errors="replace".
`IntegerTokenizer` / `AngleTokenizer` map the integer v to the id v + 1. Every tokenizer keeps id 0 for end of
document and offers the same small interface (`Tokenizer` below); `load_tokenizer` is the one factory callers use.
"""

from __future__ import annotations

import ast
import codecs
import functools
import operator
import re
from pathlib import Path
from typing import Iterable, Optional, Protocol, Union

from .errors import UserError
from .fileio import atomic_write_bytes, atomic_write_text

EOD_ID = 0
WORLD_VOCAB_FILE = Path(__file__).parent / "assets" / "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536  # the World models' embedding rows; the file's ids end at 65529, the rest decode to b""
TOKENIZER_KINDS = ("world", "generic", "integer")

# `<id> <literal> <byte length>`: the literal may itself contain spaces, so the length is the last field.
_VOCAB_LINE = re.compile(r"(\d+) (.+) (\d+)", re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)


class Tokenizer(Protocol):
    """What the trainer and the server may rely on, whatever the kind."""

    vocab_size: int  # ids are 0 .. vocab_size - 1
    eod_id: int  # always 0

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def incremental_decoder(self) -> "StreamDecoder": ...


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


# ------------------------------------------------------------------------------------------------ byte tokenizers


class Utf8StreamDecoder:
    """Turns token ids into text one id at a time, emitting only whole UTF-8 characters.

    A multi-byte character split across tokens is held back until its last byte arrives; bytes that can no longer
    become a valid character come out as U+FFFD, exactly where `bytes.decode(errors="replace")` puts them, so the
    concatenated pushes plus `flush()` equal `decode(ids)`.
    """

    def __init__(self, token_bytes):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes(token_id))

    def flush(self) -> str:
        """The held-back tail (an unfinished character becomes U+FFFD); the decoder is then fresh again."""
        return self._utf8.decode(b"", final=True)


class GenericTokenizer:
    """Any vocab file in the World format; greedy longest byte match with a byte trie."""

    eod_id = EOD_ID

    def __init__(self, vocab_path: Union[str, Path]):
        self.vocab_path = Path(vocab_path)
        self._tokens, self._trie = _load_vocab(self.vocab_path)
        self.vocab_size = max(self._tokens) + 1

    # encoding
    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Greedy longest match: at each position take the longest vocab token that the bytes start with."""
        ids: list[int] = []
        pos, end = 0, len(data)
        root = self._trie
        while pos < end:
            node, best_id, best_end, i = root, -1, pos, pos
            while i < end:
                entry = node.get(data[i])
                if entry is None:
                    break
                node, token_id = entry
                i += 1
                if token_id >= 0:
                    best_id, best_end = token_id, i
            if best_id < 0:
                raise UserError(f"cannot encode byte {data[pos]:#04x} at byte offset {pos}: no token in "
                                f"{self.vocab_path} starts with it")
            ids.append(best_id)
            pos = best_end
        return ids

    # decoding
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for end of document and for ids the vocab file leaves unused)."""
        return self._tokens.get(self._check_id(token_id), b"")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tokens = self._tokens
        return b"".join([tokens.get(self._check_id(i), b"") for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> Utf8StreamDecoder:
        return Utf8StreamDecoder(self.token_bytes)

    def save_vocab(self, path: Union[str, Path]) -> None:
        """Write the vocab in the World format (str literal where the bytes are UTF-8, bytes literal otherwise)."""
        lines = [f"{i} {_literal(b)} {len(b)}\n" for i, b in sorted(self._tokens.items())]
        atomic_write_text(path, "".join(lines))

    def _check_id(self, token_id: int) -> int:
        token_id = operator.index(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise UserError(f"token id {token_id} is outside 0..{self.vocab_size - 1} (vocab {self.vocab_path})")
        return token_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.vocab_path)!r}, vocab_size={self.vocab_size})"


class WorldTokenizer(GenericTokenizer):
    """The RWKV World tokenizer (bundled `rwkv_vocab_v20230424`, vocab_size 65536).

    Encoding uses the Rust `pyrwkv_tokenizer` package when it is installed and reproduces our ids on a probe text,
    the pure-Python trie otherwise (`fast=False` forces it); `backend` says which one is in use.
    """

    def __init__(self, fast: bool = True):
        self.vocab_path = WORLD_VOCAB_FILE
        self._tokens, self._trie = _world_vocab()
        self.vocab_size = WORLD_VOCAB_SIZE
        self._fast = _fast_world_encoder() if fast else None
        self.backend = "pyrwkv_tokenizer" if self._fast is not None else "python"

    def encode(self, text: str) -> list[int]:
        data = _utf8(text)  # rejects lone surrogates for both backends
        return self._fast.encode(text) if self._fast is not None else self.encode_bytes(data)

    def __repr__(self) -> str:
        return f"WorldTokenizer(backend={self.backend!r})"


# Texts whose ids both World backends must agree on before the fast one is trusted.
_WORLD_PROBE = ("Hello world! 你好\n\nUser: hi\n\nAssistant: \x00\x01abc 日本語のテキスト 🙂👍🏽 مرحبا e\u0301 \t\r\n"
                "    def f(x):\n        return x  # ----------------------------------------------------------")


@functools.lru_cache(maxsize=1)
def _world_vocab() -> tuple[dict[int, bytes], dict]:
    """The bundled vocab, parsed once per process (it takes about half a second); never mutated."""
    return _load_vocab(WORLD_VOCAB_FILE)


@functools.lru_cache(maxsize=1)
def _fast_world_encoder():
    """The Rust World encoder if it is importable and matches our trie on the probe text, else None."""
    trie_ids = WorldTokenizer(fast=False).encode(_WORLD_PROBE)
    try:
        import pyrwkv_tokenizer

        fast = pyrwkv_tokenizer.WorldTokenizer(str(WORLD_VOCAB_FILE))
        agrees = fast.encode(_WORLD_PROBE) == trie_ids
    except Exception:  # an optional accelerator: any failure to import or run it means "use the Python trie"
        return None
    return fast if agrees else None


def _load_vocab(path: Path) -> tuple[dict[int, bytes], dict]:
    """A vocab file as {id: bytes} and its byte trie (read afresh each time: the server reloads edited files)."""
    tokens = _read_vocab_file(path)
    return tokens, _build_trie(tokens)


def _read_vocab_file(path: Path) -> dict[int, bytes]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"vocab file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise UserError(f"vocab file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read vocab file {path}: {e.strerror}") from None

    tokens: dict[int, bytes] = {}
    line_of_id: dict[int, int] = {}
    id_of_bytes: dict[bytes, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): it also splits at \x1c, \u2028...
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        match = _VOCAB_LINE.fullmatch(line)
        value = _parse_literal(match.group(2)) if match else None
        if value is None:
            raise UserError(f"{where}: cannot parse {_clip(line)}; expected `<id> <python str or bytes literal> "
                            f"<byte length>`")
        try:
            data = value.encode("utf-8") if isinstance(value, str) else value
        except UnicodeEncodeError:
            raise UserError(f"{where}: the token {_clip(match.group(2))} is not valid Unicode") from None
        token_id, length = int(match.group(1)), int(match.group(3))
        if len(data) != length:
            raise UserError(f"{where}: the token {_clip(match.group(2))} has {len(data)} bytes but the line says "
                            f"{length}")
        if not data:
            raise UserError(f"{where}: empty token; every token needs at least one byte")
        if token_id in tokens:
            raise UserError(f"{where}: duplicate id {token_id} (first on line {line_of_id[token_id]})")
        if data in id_of_bytes:
            raise UserError(f"{where}: the token {_clip(match.group(2))} already has id {id_of_bytes[data]}")
        tokens[token_id], line_of_id[token_id], id_of_bytes[data] = data, lineno, token_id
    if not tokens:
        raise UserError(f"vocab file {path} has no tokens")
    return tokens


def _parse_literal(text: str) -> Optional[Union[str, bytes]]:
    """A python str or bytes literal, evaluated safely; None when the text is anything else."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, (str, bytes)) else None


def _build_trie(tokens: dict[int, bytes]) -> dict:
    """Nested {byte: [child node, id or -1]}; the id is set where a token ends."""
    root: dict = {}
    for token_id, data in tokens.items():
        node, entry = root, None
        for byte in data:
            entry = node.get(byte)
            if entry is None:
                entry = node[byte] = [{}, -1]
            node = entry[0]
        entry[1] = token_id
    return root


def _literal(data: bytes) -> str:
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the text has a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}; "
                        f"it is not valid Unicode") from None


def _clip(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def create_vocab_file_from_tokens(tokens: Iterable[Union[str, bytes]], path: Union[str, Path]) -> Path:
    """Write a vocab file for `GenericTokenizer`: id 0 is b'\\x00' (end of document), the tokens get ids 1, 2, ..."""
    entries = [b"\x00"]
    seen = {b"\x00": 0}
    for i, token in enumerate(tokens, start=1):
        if isinstance(token, str):
            data = _utf8(token)
        elif isinstance(token, bytes):
            data = token
        else:
            raise UserError(f"token {i - 1} is {type(token).__name__} {token!r}; tokens must be str or bytes")
        if not data:
            raise UserError(f"token {i - 1} is empty; every token needs at least one byte")
        if data == b"\x00":
            raise UserError(f"token {i - 1} is {token!r}, the byte that id 0 (end of document) already has")
        if data in seen:
            raise UserError(f"token {i - 1} {token!r} repeats token {seen[data] - 1}")
        seen[data] = i
        entries.append(data)
    lines = ["0 b'\\x00' 1\n"] + [f"{i} {_literal(b)} {len(b)}\n" for i, b in enumerate(entries) if i]
    atomic_write_text(path, "".join(lines))
    return Path(path)


def create_default_vocab_file(path: Union[str, Path]) -> Path:
    """Write the bundled World vocab (`rwkv_vocab_v20230424.txt`, byte for byte) to `path`."""
    atomic_write_bytes(path, WORLD_VOCAB_FILE.read_bytes())
    return Path(path)


# --------------------------------------------------------------------------------------------- integer tokenizers


class IntegerStreamDecoder:
    """Streams `IntegerTokenizer.decode`: values separated by single spaces, end of document emits nothing."""

    def __init__(self, tokenizer: "IntegerTokenizer"):
        self._tokenizer = tokenizer
        self._started = False

    def push(self, token_id: int) -> str:
        values = self._tokenizer.decode_sequence([token_id])
        if not values:
            return ""
        text = f" {values[0]}" if self._started else str(values[0])
        self._started = True
        return text

    def flush(self) -> str:
        return ""


class IntegerTokenizer:
    """Integers 0..max_value: value v <-> id v + 1, id 0 = end of document, vocab_size = max_value + 2."""

    eod_id = EOD_ID

    def __init__(self, max_value: int):
        if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 0:
            raise UserError(f"max_value must be an integer >= 0, got {max_value!r}")
        self.max_value = max_value
        self.vocab_size = max_value + 2

    def encode_sequence(self, values: Iterable[int]) -> list[int]:
        return [self._check_value(v) + 1 for v in values]

    def decode_sequence(self, ids: Iterable[int]) -> list[int]:
        """Values of the ids; end-of-document ids (0) are skipped."""
        return [token_id - 1 for token_id in map(self._check_id, ids) if token_id != EOD_ID]

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated integers, e.g. "1 2 3" -> [2, 3, 4]."""
        values = []
        for word in text.split():
            if not _INTEGER.fullmatch(word):
                raise UserError(f"{_clip(word)} is not an integer; {type(self).__name__} reads whitespace-separated "
                                f"integers 0..{self.max_value}")
            values.append(int(word))
        return self.encode_sequence(values)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(map(str, self.decode_sequence(ids)))

    def token_bytes(self, token_id: int) -> bytes:
        """The value's decimal digits (b"" for end of document)."""
        values = self.decode_sequence([token_id])
        return str(values[0]).encode("ascii") if values else b""

    def incremental_decoder(self) -> IntegerStreamDecoder:
        return IntegerStreamDecoder(self)

    def _check_value(self, value: int) -> int:
        try:
            value = operator.index(value)  # accepts numpy integers, refuses floats
        except TypeError:
            raise UserError(f"value {value!r} is not an integer") from None
        if not 0 <= value <= self.max_value:
            raise UserError(f"value {value} is outside {type(self).__name__}'s range 0..{self.max_value}")
        return value

    def _check_id(self, token_id: int) -> int:
        token_id = operator.index(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise UserError(f"token id {token_id} is outside 0..{self.vocab_size - 1} ({type(self).__name__} with "
                            f"max_value {self.max_value})")
        return token_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_value={self.max_value})"


class AngleTokenizer(IntegerTokenizer):
    """Whole degrees 0..359 (rwkv_trainer's angle data): angle a <-> id a + 1, vocab_size 361."""

    def __init__(self):
        super().__init__(359)

    def encode_angle_sequence(self, angles: Iterable[int]) -> list[int]:
        return self.encode_sequence(angles)

    def decode_angle_sequence(self, ids: Iterable[int]) -> list[int]:
        return self.decode_sequence(ids)

    def __repr__(self) -> str:
        return "AngleTokenizer()"


# ------------------------------------------------------------------------------------------------------- factory


def load_tokenizer(kind: str, vocab_path: Union[str, Path, None] = None,
                   max_value: Optional[int] = None) -> Union[WorldTokenizer, GenericTokenizer, IntegerTokenizer]:
    """The tokenizer a config names: "world" (bundled vocab), "generic" (needs vocab_path), "integer" (max_value)."""
    if kind not in TOKENIZER_KINDS:
        raise UserError(f"unknown tokenizer {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")
    if kind != "generic" and vocab_path is not None:
        raise UserError(f"tokenizer {kind!r} takes no vocab file (got {vocab_path}); use \"generic\" to read one")
    if kind != "integer" and max_value is not None:
        raise UserError(f"tokenizer {kind!r} takes no max_value (got {max_value}); it is for \"integer\"")
    if kind == "world":
        return WorldTokenizer()
    if kind == "generic":
        if vocab_path is None:
            raise UserError("tokenizer \"generic\" needs a vocab file (vocab_path)")
        return GenericTokenizer(vocab_path)
    if max_value is None:
        raise UserError("tokenizer \"integer\" needs max_value, the largest value")
    return IntegerTokenizer(max_value)
