"""Tokenizers: the spec's goldens, the official `rwkv` tokenizer as oracle, round trips, vocab files, streaming
decode and every bad-input path."""

import random
import sys
import types

import pytest

from rwkv_app import tokenizer as tk
from rwkv_app.errors import UserError
from rwkv_app.tokenizer import (AngleTokenizer, GenericTokenizer, IntegerTokenizer, WorldTokenizer,
                                create_default_vocab_file, create_vocab_file_from_tokens, load_tokenizer)

WORLD_GOLDENS = [
    ("Hello world! 你好", [33155, 40213, 34, 33, 10464, 11685]),
    ("\n\n", [261]),
    ("User: hi\n\nAssistant:", [24281, 59, 4571, 261, 5585, 41693, 59]),
    ("\x00\x01abc", [1, 2, 6891]),
]
MULTILINGUAL = [
    "",
    "The quick brown fox jumps over the lazy dog.",
    "中华人民共和国成立于1949年。今天天气很好，我们去公园散步吧！",
    "日本語のテキスト：カタカナ、ひらがな、漢字。ｶﾀｶﾅ",
    "emoji 🙂👍🏽👨‍👩‍👧‍👦🏳️‍🌈 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎𠜱",
    "مرحبا بالعالم — שלום עולם",
    "combining: e\u0301 a\u0308 n\u0303 \u1100\u1161\u11a8 Z\u0351\u0352\u0353",
    "control: \x00\x01\x07\x1b[31m\x7f\t\r\n\x0b\x0c\x85\u2028\u2029\ufeff",
    "    def f(x):\n        return {'a': [1, 2.5e-3]}  # comment\n\n\n",
    "Ω≈ç√∫˜µ≤≥÷ ﷽ \U0010ffff \ufffd",
]


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def world_python():
    return WorldTokenizer(fast=False)


@pytest.fixture(scope="module")
def byte_vocab(tmp_path_factory):
    """A vocab of the 255 single bytes 1..255 (id = byte value): every multi-byte character spans tokens."""
    path = tmp_path_factory.mktemp("vocab") / "bytes.txt"
    create_vocab_file_from_tokens([bytes([b]) for b in range(1, 256)], path)
    return GenericTokenizer(path)


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------------------- World


@pytest.mark.parametrize("backend", ["pyrwkv_tokenizer", "python"])
def test_world_goldens_on_both_backends(backend, world, world_python):
    tok = world_python if backend == "python" else world
    if backend == "pyrwkv_tokenizer":
        pytest.importorskip("pyrwkv_tokenizer")
    assert tok.backend == backend
    for text, ids in WORLD_GOLDENS:
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text


def test_world_agrees_with_the_official_rwkv_tokenizer(world, world_python):
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    official = TRIE_TOKENIZER(str(tk.WORLD_VOCAB_FILE))
    rng = random.Random(3)
    alphabet = "".join(MULTILINGUAL) + "aaaa    ----____\n\n\n"
    texts = MULTILINGUAL + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    for text in texts:
        expected = official.encode(text)
        assert world.encode(text) == expected, text
        assert world_python.encode(text) == expected, text
        assert world.decode(expected) == official.decode(expected)


def test_world_round_trips_multilingual_text(world, world_python):
    for text in MULTILINGUAL:
        ids = world.encode(text)
        assert all(0 < i < world.vocab_size for i in ids)
        assert world.decode(ids) == text
        assert world.decode_bytes(ids) == text.encode("utf-8")
        assert b"".join(world.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert world_python.decode(world_python.encode(text)) == text


def test_world_vocab_shape(world):
    assert len(tk.WORLD_VOCAB_FILE.read_bytes().splitlines()) == 65529
    assert world.vocab_size == 65536 and world.eod_id == 0
    assert world.token_bytes(0) == b"" and world.token_bytes(65535) == b""  # EOD and the padding ids
    assert world.token_bytes(250) == b"\xf9" and world.token_bytes(65529) == b" " * 128
    assert world.decode([0, 33155, 65533]) == "Hello"


def test_world_save_vocab_and_default_file_reproduce_the_bundled_file(world, tmp_path):
    world.save_vocab(tmp_path / "saved.txt")
    create_default_vocab_file(tmp_path / "default.txt")
    bundled = tk.WORLD_VOCAB_FILE.read_bytes()
    assert (tmp_path / "saved.txt").read_bytes() == bundled
    assert (tmp_path / "default.txt").read_bytes() == bundled
    generic = GenericTokenizer(tmp_path / "default.txt")
    assert generic.vocab_size == 65530
    assert generic.encode(MULTILINGUAL[4]) == world.encode(MULTILINGUAL[4])


def test_fast_backend_is_used_only_when_it_agrees(monkeypatch):
    class WrongIds:
        def __init__(self, path):
            pass

        def encode(self, text):
            return [1] * len(text)

    try:
        monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", types.SimpleNamespace(WorldTokenizer=WrongIds))
        tk._fast_world_encoder.cache_clear()
        assert WorldTokenizer().backend == "python"
        monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", None)  # not installed
        tk._fast_world_encoder.cache_clear()
        tok = WorldTokenizer()
        assert tok.backend == "python"
        assert tok.encode(WORLD_GOLDENS[0][0]) == WORLD_GOLDENS[0][1]
    finally:
        tk._fast_world_encoder.cache_clear()


# ----------------------------------------------------------------------------------------------------- Generic


def test_create_vocab_file_from_tokens_spec_golden(tmp_path):
    path = create_vocab_file_from_tokens(["hello", "world", " ", "!"], tmp_path / "vocab.txt")
    assert path.read_text(encoding="utf-8") == "0 b'\\x00' 1\n1 'hello' 5\n2 'world' 5\n3 ' ' 1\n4 '!' 1\n"
    tok = GenericTokenizer(path)
    assert tok.encode("hello world!") == [1, 3, 2, 4]
    assert tok.decode([1, 3, 2, 4]) == "hello world!"
    assert tok.vocab_size == 5 and tok.eod_id == 0


def greedy_reference(vocab: dict[bytes, int], data: bytes) -> list[int]:
    """Greedy longest match by trying every length, longest first."""
    ids, pos, longest = [], 0, max(map(len, vocab))
    while pos < len(data):
        size = next(n for n in range(min(longest, len(data) - pos), 0, -1) if data[pos:pos + n] in vocab)
        ids.append(vocab[data[pos:pos + size]])
        pos += size
    return ids


def test_generic_is_greedy_longest_match(tmp_path):
    tokens = ["a", "b", "c", "ab", "abc", "bc", "bca", "cab", "aaaa", "你", "你好", "好"]
    tok = GenericTokenizer(create_vocab_file_from_tokens(tokens, tmp_path / "v.txt"))
    vocab = {t.encode(): i for i, t in enumerate(tokens, start=1)}
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc你好") for _ in range(rng.randint(0, 30)))
        assert tok.encode(text) == greedy_reference(vocab, text.encode()), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("abcab") == [5, 4]
    assert tok.encode("aaaaa") == [9, 1]


def test_save_vocab_loads_back_identical(tmp_path):
    tokens = ["hello", " world", "'", '"', "\\", "\n", "\r\n", " ", "a b c", "你好", "🙂", "\x85", "\u2028",
              b"\xff\xfe", b"\xe4\xbd", b"\x80", "' 3", "1 '1' 1"]
    original = GenericTokenizer(create_vocab_file_from_tokens(tokens, tmp_path / "v.txt"))
    original.save_vocab(tmp_path / "saved.txt")
    loaded = GenericTokenizer(tmp_path / "saved.txt")
    assert loaded.vocab_size == original.vocab_size == len(tokens) + 1
    assert [loaded.token_bytes(i) for i in range(loaded.vocab_size)] == \
        [original.token_bytes(i) for i in range(original.vocab_size)]
    assert [loaded.token_bytes(i) for i in range(1, loaded.vocab_size)] == \
        [t.encode() if isinstance(t, str) else t for t in tokens]
    text = "hello world\r\n你好🙂 a b c"
    assert loaded.encode(text) == original.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


def test_generic_reads_crlf_files_with_gaps_and_blank_lines(tmp_path):
    path = tmp_path / "v.txt"
    path.write_bytes(b"1 'x' 1\r\n\r\n7 b'\\xff' 1\r\n3 'a b' 3\r\n")
    tok = GenericTokenizer(path)
    assert tok.vocab_size == 8
    assert tok.encode("xa bx") == [1, 3, 1]
    assert tok.decode_bytes([7, 0, 5, 1]) == b"\xffx"  # unused ids decode to nothing


# ----------------------------------------------------------------------------------------- Integer and Angle


def test_integer_tokenizer_rwkv_trainer_examples():
    tok = IntegerTokenizer(max_value=999)
    assert tok.vocab_size == 1001 and tok.eod_id == 0
    assert tok.encode_sequence([0, 100, 500, 999]) == [1, 101, 501, 1000]
    assert tok.decode_sequence([1, 101, 501, 1000]) == [0, 100, 500, 999]
    assert tok.encode("10 20 30") == [11, 21, 31]
    assert tok.encode(" 1\t2\n3 ") == [2, 3, 4]
    assert tok.decode([11, 21, 0, 31]) == "10 20 30"  # end of document is skipped
    assert tok.token_bytes(1000) == b"999" and tok.token_bytes(0) == b""


def test_angle_tokenizer_rwkv_trainer_examples():
    tok = AngleTokenizer()
    assert tok.vocab_size == 361
    assert tok.encode_angle_sequence([0, 45, 90]) == [1, 46, 91]
    assert tok.decode_angle_sequence([1, 46, 91, 360]) == [0, 45, 90, 359]
    assert tok.encode("359 0") == [360, 1]


def test_integer_incremental_decoder_matches_decode():
    tok = IntegerTokenizer(50)
    ids = [0, 5, 51, 0, 1, 0, 17]
    stream = tok.incremental_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids) == "4 50 0 16"


# --------------------------------------------------------------------------------------- incremental decoder


def test_incremental_decoder_holds_split_characters(byte_vocab, world):
    for text in MULTILINGUAL:
        text = text.replace("\x00", "")  # the byte vocab's id 0 is end of document
        for tok in (byte_vocab, world):
            ids = tok.encode(text)
            stream = tok.incremental_decoder()
            shown = ""
            for token_id in ids:
                shown += stream.push(token_id)
                assert text.startswith(shown)  # never a U+FFFD nor half a character on the way
            assert shown + stream.flush() == tok.decode(ids) == text
    emoji = "🙂".encode()
    stream = byte_vocab.incremental_decoder()
    assert [stream.push(b) for b in emoji] == ["", "", "", "🙂"]


def test_incremental_decoder_on_invalid_bytes_equals_decode(byte_vocab):
    rng = random.Random(1)
    interesting = [0xE4, 0xBD, 0xA0, 0xF0, 0x9F, 0x99, 0x82, 0xC3, 0xA9, 0xED, 0xA0, 0x80, 0xF4, 0x90, 0xC0, 0xFF]
    for _ in range(2000):
        ids = [rng.choice(interesting) if rng.random() < 0.8 else rng.randint(1, 255) for _ in range(rng.randint(0, 9))]
        stream = byte_vocab.incremental_decoder()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == bytes(ids).decode("utf-8", errors="replace")
    stream = byte_vocab.incremental_decoder()
    assert stream.push(0xF0) == "" and stream.push(0x41) == "\ufffdA"  # certain only once the A arrives
    assert stream.push(0xE4) == "" and stream.flush() == "\ufffd" and stream.push(0x42) == "B"


# ------------------------------------------------------------------------------------------------------ factory


def test_load_tokenizer_kinds(tmp_path):
    assert isinstance(load_tokenizer("world"), WorldTokenizer)
    path = create_vocab_file_from_tokens(["x"], tmp_path / "v.txt")
    generic = load_tokenizer("generic", vocab_path=path)
    assert type(generic) is GenericTokenizer and generic.encode("xx") == [1, 1]
    integer = load_tokenizer("integer", max_value=7)
    assert isinstance(integer, IntegerTokenizer) and integer.vocab_size == 9
    import rwkv_app

    assert rwkv_app.load_tokenizer is load_tokenizer and rwkv_app.AngleTokenizer is AngleTokenizer


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, fragments", [
    ("1 'abc' 4\n", [":1:", "3 bytes", "says 4"]),
    ("1 'a' 1\n2 '你' 1\n", [":2:", "3 bytes"]),
    ("1 'a' 1\n2 b'a\n", [":2:", "cannot parse"]),
    ("1 'a'\n", [":1:", "cannot parse"]),
    ("x 'a' 1\n", [":1:", "cannot parse"]),
    ("1 a 1\n", [":1:", "cannot parse"]),
    ("1 123 3\n", [":1:", "cannot parse"]),
    ("1 __import__('os').getcwd() 1\n", [":1:", "cannot parse"]),
    ("1 '\\ud800' 3\n", [":1:", "not valid Unicode"]),
    ("1 'a' 1\n\n1 'b' 1\n", [":3:", "duplicate id 1", "line 1"]),
    ("1 'a' 1\n2 b'a' 1\n", [":2:", "already has id 1"]),
    ("1 '' 0\n", [":1:", "empty token"]),
    ("\n\n", ["has no tokens"]),
])
def test_bad_vocab_files(tmp_path, content, fragments):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        GenericTokenizer(path)
    one_line_error(excinfo, str(path), *fragments)


def test_unreadable_vocab_files(tmp_path):
    with pytest.raises(UserError) as excinfo:
        GenericTokenizer(tmp_path / "missing.txt")
    one_line_error(excinfo, "missing.txt", "does not exist")
    (tmp_path / "latin1.txt").write_bytes(b"1 '\xe9' 1\n")
    with pytest.raises(UserError) as excinfo:
        GenericTokenizer(tmp_path / "latin1.txt")
    one_line_error(excinfo, "latin1.txt", "not UTF-8")
    with pytest.raises(UserError) as excinfo:
        GenericTokenizer(tmp_path)
    one_line_error(excinfo, str(tmp_path), "cannot read")


def test_text_and_ids_outside_a_byte_vocab(tmp_path, world):
    tok = GenericTokenizer(create_vocab_file_from_tokens(["a", "b"], tmp_path / "v.txt"))
    with pytest.raises(UserError) as excinfo:
        tok.encode("abca")
    one_line_error(excinfo, "0x63", "offset 2", "v.txt")
    for bad in (3, -1):
        with pytest.raises(UserError) as excinfo:
            tok.decode([1, bad])
        one_line_error(excinfo, f"token id {bad}", "0..2")
    for call in (lambda: world.decode([65536]), lambda: world.token_bytes(70000),
                 lambda: world.incremental_decoder().push(65536)):
        with pytest.raises(UserError) as excinfo:
            call()
        one_line_error(excinfo, "outside 0..65535")
    for tokenizer in (world, tok):
        with pytest.raises(UserError) as excinfo:
            tokenizer.encode("a\ud800")
        one_line_error(excinfo, "U+D800", "character 1")


def test_integer_values_and_ids_out_of_range():
    tok = IntegerTokenizer(max_value=9)
    cases = [
        (lambda: tok.encode_sequence([3, 10]), ["value 10", "0..9"]),
        (lambda: tok.encode_sequence([-1]), ["value -1", "0..9"]),
        (lambda: tok.encode_sequence([1.5]), ["1.5", "not an integer"]),
        (lambda: tok.encode("1 2 -3"), ["value -3"]),
        (lambda: tok.encode("1 2 x"), ["'x'", "not an integer"]),
        (lambda: tok.encode("1 2.0"), ["'2.0'", "not an integer"]),
        (lambda: tok.decode([11]), ["token id 11", "0..10"]),
        (lambda: tok.decode_sequence([-1]), ["token id -1"]),
        (lambda: tok.incremental_decoder().push(12), ["token id 12"]),
        (lambda: AngleTokenizer().encode_angle_sequence([360]), ["value 360", "0..359"]),
        (lambda: IntegerTokenizer(-1), ["max_value", "-1"]),
        (lambda: IntegerTokenizer("9"), ["max_value", "'9'"]),
    ]
    for call, fragments in cases:
        with pytest.raises(UserError) as excinfo:
            call()
        one_line_error(excinfo, *fragments)


def test_bad_token_lists(tmp_path):
    cases = [
        (["a", "b", "a"], ["token 2", "repeats token 0"]),
        (["a", ""], ["token 1", "empty"]),
        (["\x00"], ["token 0", "id 0"]),
        (["a", 5], ["token 1", "int"]),
    ]
    for tokens, fragments in cases:
        with pytest.raises(UserError) as excinfo:
            create_vocab_file_from_tokens(tokens, tmp_path / "v.txt")
        one_line_error(excinfo, *fragments)
    assert not (tmp_path / "v.txt").exists()


def test_load_tokenizer_errors(tmp_path):
    cases = [
        (dict(kind="bpe"), ["'bpe'", "world, generic, integer"]),
        (dict(kind="generic"), ["needs a vocab file"]),
        (dict(kind="integer"), ["needs max_value"]),
        (dict(kind="world", vocab_path=tmp_path / "v.txt"), ["takes no vocab file", "v.txt"]),
        (dict(kind="generic", vocab_path=tmp_path / "v.txt", max_value=3), ["takes no max_value"]),
        (dict(kind="generic", vocab_path=tmp_path / "v.txt"), ["v.txt", "does not exist"]),
    ]
    for kwargs, fragments in cases:
        with pytest.raises(UserError) as excinfo:
            load_tokenizer(**kwargs)
        one_line_error(excinfo, *fragments)
