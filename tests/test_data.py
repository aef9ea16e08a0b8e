"""Token files, magic-prime sampling and `rwkv-data prepare`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwkv_app.data.binidx import BinIdx, RwkvBin, TokenWriter, open_tokens, token_dtype, write_tokens
from rwkv_app.data.prepare import prepare_dataset
from rwkv_app.data.sampler import MagicPrimeSampler, is_prime, magic_prime, magic_prime_or_zero
from rwkv_app.errors import UserError
from rwkv_app.tokenizer import GenericTokenizer, IntegerTokenizer, create_vocab_file_from_tokens

REPO = Path(__file__).resolve().parents[1]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------- binidx


def test_worked_example_is_byte_identical_to_the_spec(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n')
    summary = prepare_dataset([tmp_path / "docs.jsonl"], IntegerTokenizer(9), tmp_path / "ex", progress=False)
    assert (tmp_path / "ex.bin").read_bytes() == np.array([2, 3, 4, 0, 5, 6, 0], dtype="<u2").tobytes()
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 2, 3)
           + struct.pack("<2i", 4, 3) + struct.pack("<2q", 0, 8) + struct.pack("<3q", 0, 1, 2))
    assert (tmp_path / "ex.idx").read_bytes() == idx
    assert (summary.documents, summary.tokens) == (2, 7)


def test_reader_maps_the_file_and_slices_the_flat_stream(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 60000, size=n) for n in (5, 1, 17, 300)]
    assert write_tokens(tmp_path / "d", docs) == sum(len(d) + 1 for d in docs)
    data = open_tokens(tmp_path / "d")
    assert isinstance(data, BinIdx) and isinstance(data.tokens, np.memmap)
    flat = np.concatenate([np.append(d, 0) for d in docs])
    assert len(data) == len(flat) and data.num_documents == 4 and data.dtype == np.uint16
    np.testing.assert_array_equal(data.get(3, 50), flat[3:53])
    with pytest.raises(IndexError):
        data.get(len(flat) - 2, 3)


def test_rwkv_rs_format_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 65535, size=n) for n in (400, 700)]
    n = write_tokens(tmp_path / "r", docs, fmt="rwkv")
    raw = (tmp_path / "r.bin").read_bytes()
    assert raw[:8] == b"RWKVBIN\x00" and struct.unpack_from("<QQQB", raw, 8) == (1, n, 1, 1)
    assert len(raw) == 89 + 2 * n
    data = open_tokens(tmp_path / "r", "rwkv")
    assert isinstance(data, RwkvBin) and data.stored_primes[128] == magic_prime_or_zero(n, 128)
    np.testing.assert_array_equal(data.get(0, n), np.concatenate([np.append(d, 0) for d in docs]))


def test_corrupt_or_missing_files_are_one_line_errors(tmp_path):
    assert "not found" in error_of(open_tokens, tmp_path / "nothing")
    write_tokens(tmp_path / "d", [[1, 2, 3]])
    with open(tmp_path / "d.bin", "ab") as f:
        f.write(b"\x01\x00")
    assert "corrupt" in error_of(open_tokens, tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"garbage" * 10)
    assert "not a binidx index" in error_of(open_tokens, tmp_path / "d")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 100)
    assert "not an rwkv-rs dataset" in error_of(open_tokens, tmp_path / "x", "rwkv")


def test_vocab_must_fit_the_dtype(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    assert "does not fit the `rwkv` dataset format" in error_of(token_dtype, 70000, "rwkv")
    with pytest.raises(UserError, match="does not fit the dataset dtype uint8"):
        with TokenWriter(tmp_path / "small", np.uint8) as w:
            w.add([1, 2, 300])
    assert not (tmp_path / "small.bin").exists() and not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------------------------------ sampling


def test_magic_prime_facts_of_the_spec():
    assert magic_prime(1_498_226_207, 512) == 2_926_181
    assert magic_prime(1_498_226_207, 4096) == 365_759
    assert [n for n in range(60) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]
    assert is_prime(2_926_181) and not is_prime(2_926_183 * 3)
    assert "too few for context_length 100" in error_of(magic_prime, 250, 100)


def test_sample_offsets_of_the_spec():
    sampler = MagicPrimeSampler(num_tokens=198 * 50 + 7, ctx_len=50, micro_batch_size=1, mini_epoch_samples=5)
    assert sampler.prime == 197
    assert [sampler.offset(0, i) for i in range(5)] == [6050, 9000, 5750, 3050, 7650]


def test_ranks_interleave_and_mini_epochs_advance():
    common = dict(num_tokens=100_000, ctx_len=16, micro_batch_size=3, mini_epoch_samples=24)
    single = MagicPrimeSampler(world_size=1, **common)
    # one process reading 2 micro-batches of 3 == samples 0..5 of the run; two ranks of 3 each read them together
    alone = single.micro_batch_offsets(0) + single.micro_batch_offsets(1)
    ranks = [MagicPrimeSampler(world_size=2, rank=r, **common).micro_batch_offsets(0) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(alone)
    assert ranks[0] == alone[0::2] and ranks[1] == alone[1::2]
    # micro-batch 8 is the first of mini-epoch 1: new slots, not a replay of mini-epoch 0
    assert single.micro_batches_per_mini_epoch == 8 and single.mini_epoch_of(8) == 1
    epoch0 = {o for m in range(8) for o in single.micro_batch_offsets(m)}
    assert len(epoch0) == 24 and not epoch0 & set(single.micro_batch_offsets(8))
    assert all(o % 16 == 0 and o + 17 <= 100_000 for o in epoch0)
    assert "must be a multiple" in error_of(MagicPrimeSampler, world_size=5, **common)


def test_every_slot_is_read_once_per_prime_samples():
    sampler = MagicPrimeSampler(num_tokens=60 * 10, ctx_len=10, micro_batch_size=1, mini_epoch_samples=1000)
    p = sampler.prime  # 59
    assert sorted(sampler.offset(0, i) // 10 for i in range(p)) == list(range(p))


# ------------------------------------------------------------------------------------------------------- prepare


def test_prepare_reads_jsonl_text_and_numpy(tmp_path):
    vocab = create_vocab_file_from_tokens(["hello", " world", "!", "\n"], tmp_path / "vocab.txt")
    tok = GenericTokenizer(vocab)
    (tmp_path / "a.jsonl").write_text('{"text": "hello world!"}\n\n{"text": ""}\n{"text": "hello"}\n')
    (tmp_path / "b.txt").write_text("hello!\nhello")
    s = prepare_dataset([tmp_path / "a.jsonl", tmp_path / "b.txt"], tok, tmp_path / "g", ctx_len=2, progress=False)
    assert s.documents == 3  # blank line and empty text skipped; the .txt file is one document
    assert open_tokens(tmp_path / "g").get(0, s.tokens).tolist() == [1, 2, 3, 0, 1, 0, 1, 3, 4, 1, 0]
    assert s.magic_prime == magic_prime_or_zero(11, 2)

    np.save(tmp_path / "rows.npy", np.array([[0, 5, 9], [3, 3, 3]], dtype=np.int32))
    s = prepare_dataset([tmp_path / "rows.npy"], IntegerTokenizer(9), tmp_path / "n", progress=False)
    assert open_tokens(tmp_path / "n").get(0, s.tokens).tolist() == [1, 6, 10, 0, 4, 4, 4, 0]
    assert "need tokenizer = \"integer\"" in error_of(prepare_dataset, [tmp_path / "rows.npy"], tok, tmp_path / "x",
                                                      progress=False)


def test_prepare_with_the_world_tokenizer(tmp_path):
    from rwkv_app.tokenizer import WorldTokenizer

    (tmp_path / "w.jsonl").write_text(json.dumps({"text": "Hello world! 你好"}, ensure_ascii=False) + "\n")
    s = prepare_dataset([tmp_path / "w.jsonl"], WorldTokenizer(), tmp_path / "w", progress=False)
    assert open_tokens(tmp_path / "w").get(0, s.tokens).tolist() == [33155, 40213, 34, 33, 10464, 11685, 0]
    assert s.dtype == "uint16" and s.vocab_size == 65536


def test_shuffle_and_repeat_are_seeded_permutations(tmp_path):
    lines = "".join(json.dumps({"text": " ".join(map(str, range(i, i + 3)))}) + "\n" for i in range(20))
    (tmp_path / "c.jsonl").write_text(lines)

    def docs(prefix: Path, **kw) -> list[tuple[int, ...]]:
        s = prepare_dataset([tmp_path / "c.jsonl"], IntegerTokenizer(30), prefix, progress=False, **kw)
        flat = open_tokens(prefix).get(0, s.tokens).tolist()
        out, cur = [], []
        for t in flat:
            if t == 0:
                out.append(tuple(cur)), cur.clear()
            else:
                cur.append(t)
        return out

    plain = docs(tmp_path / "plain")
    a = docs(tmp_path / "a", shuffle=True, repeat=3, seed=7)
    b = docs(tmp_path / "b", shuffle=True, repeat=3, seed=7)
    c = docs(tmp_path / "c", shuffle=True, repeat=3, seed=8)
    assert a == b and a != c and len(a) == 60
    for r in range(3):  # each repeat is a permutation of the corpus
        assert sorted(a[20 * r:20 * r + 20]) == sorted(plain) and a[20 * r:20 * r + 20] != plain
    assert docs(tmp_path / "rep", repeat=2) == plain + plain
    assert not list(tmp_path.glob(".*scratch*"))


def test_bad_source_leaves_the_previous_dataset_untouched(tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"text": "1 2"}\n')
    prepare_dataset([tmp_path / "ok.jsonl"], IntegerTokenizer(9), tmp_path / "d", progress=False)
    before = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()
    (tmp_path / "bad.jsonl").write_text('{"text": "3"}\n{"text": 4}\n')
    msg = error_of(prepare_dataset, [tmp_path / "bad.jsonl"], IntegerTokenizer(9), tmp_path / "d", progress=False)
    assert "bad.jsonl:2" in msg
    (tmp_path / "big.jsonl").write_text('{"text": "1 2 99"}\n')
    assert "outside" in error_of(prepare_dataset, [tmp_path / "big.jsonl"], IntegerTokenizer(9), tmp_path / "d",
                                 progress=False)
    assert ((tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "big.jsonl", "d.bin", "d.idx", "ok.jsonl"]
    assert "not found" in error_of(prepare_dataset, [tmp_path / "none.jsonl"], IntegerTokenizer(9), tmp_path / "e")
    assert "unknown kind" in error_of(prepare_dataset, [tmp_path / "d.idx"], IntegerTokenizer(9), tmp_path / "e")


def test_rwkv_data_cli_prepares_and_reports(tmp_path):
    cfg = tmp_path / "config"
    (cfg / "model").mkdir(parents=True)
    (cfg / "train").mkdir()
    (cfg / "model" / "m.toml").write_text("num_cells = 2\nvocab_size = 16\nembedded_dim = 64\nnum_heads = 1\n")
    (tmp_path / "nums.jsonl").write_text("".join(f'{{"text": "{i} {i + 1} {i + 2}"}}\n' for i in range(10)))
    (cfg / "train" / "t.toml").write_text(
        'model_cfg = "m"\nexperiment_name = "t"\ndataset_base_path = "../../data"\nfilename_without_extensions = "n"\n'
        'dataset_sources = ["../../nums.jsonl"]\ntokenizer = "integer"\ntokenizer_max_value = 13\n'
        'batch_size_per_device = 1\ncontext_length = 4\n')
    run = [sys.executable, "-m", "rwkv_app.cli.data", "prepare", "--config-dir", str(cfg), "--train-cfg", "t",
           "--no-progress"]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "documents: 10" in done.stdout and "tokens: 40" in done.stdout and "magic prime for ctx 4: 5" in done.stdout
    assert open_tokens(tmp_path / "data" / "n").num_tokens == 40

    (cfg / "train" / "t.toml").write_text((cfg / "train" / "t.toml").read_text().replace("= 13", "= 20"))
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "raise vocab_size" in done.stderr
