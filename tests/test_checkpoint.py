"""Checkpoint files: safetensors <-> RWKV-LM .pth <-> the official `rwkv` package, inspect, and every bad-input path."""

import json

import pytest
import torch
from safetensors.torch import save_file

import rwkv_app
from rwkv_app.config import ModelConfig
from rwkv_app.errors import UserError
from rwkv_app.model import RWKV7
from rwkv_app.model.checkpoint import (
    config_from_state_dict, export_pth, inspect_checkpoint, load_model, load_state_dict, save_checkpoint)
from test_model import official_rwkv, randomize

CFG = ModelConfig(num_cells=2, vocab_size=71, embedded_dim=64, num_heads=2, head_size=32, dropout_prob=0.1)


@pytest.fixture
def model():
    return randomize(RWKV7(CFG), seed=11)


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package uses torch.jit.script
def test_safetensors_pth_official_package_and_back(tmp_path, model):
    original = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "a.safetensors", model, CFG, metadata={"step": 12})
    sd, cfg = load_state_dict(tmp_path / "a.safetensors")
    assert same_tensors(sd, original) and cfg == CFG                  # config (dropout too) from the metadata

    export_pth(tmp_path / "a.safetensors", tmp_path / "b.pth")
    raw = torch.load(tmp_path / "b.pth", weights_only=True)
    assert same_tensors(raw, original)                                # RWKV-LM keys, rename-free
    oracle = official_rwkv(tmp_path / "b")                            # the official package loads it
    z = oracle.z
    assert torch.equal(z["blocks.1.att.receptance.weight"], original["blocks.1.att.receptance.weight"].T)
    assert torch.equal(z["blocks.1.att.r_k"], original["blocks.1.att.r_k"].flatten())
    assert torch.equal(z["blocks.0.ffn.x_k"], original["blocks.0.ffn.x_k"].squeeze())
    assert oracle.n_layer == 2 and oracle.head_size == 32

    sd, cfg = load_state_dict(tmp_path / "b.pth")                     # and back
    assert same_tensors(sd, original) and cfg.head_dim == 32 and cfg.lora_ranks == CFG.lora_ranks
    save_checkpoint(tmp_path / "c.safetensors", sd, cfg)
    assert same_tensors(load_state_dict(tmp_path / "c.safetensors")[0], original)


def test_rwkv_lm_pth_in_bf16_with_prefixes(tmp_path, model):
    wrapped = {"_forward_module." + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "lm.pth")
    sd, cfg = load_state_dict(tmp_path / "lm.pth")
    assert "emb.weight" in sd and sd["emb.weight"].dtype == torch.bfloat16
    assert cfg.n_layer == 2 and cfg.n_embd == 64 and cfg.head_dim == 32 and cfg.vocab_size == 71
    loaded = rwkv_app.load_model(tmp_path / "lm.pth")                  # public API; fp32 by default, eval mode
    assert loaded.dtype == torch.float32 and not loaded.training
    assert torch.equal(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"].bfloat16().float())


def test_load_model_round_trip_and_squeezed_tensors(tmp_path, model):
    sd = model.state_dict()
    squeezed = {k: (v.flatten() if k.endswith((".x_r", ".r_k", ".w0")) else v) for k, v in sd.items()}
    squeezed["blocks.0.att.r_k"] = sd["blocks.0.att.r_k"]             # head size still readable from block 0
    torch.save(squeezed, tmp_path / "sq.pth")
    loaded = load_model(tmp_path / "sq.pth", expect=CFG)
    assert loaded.cfg == CFG and same_tensors(loaded.state_dict(), sd)
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model.eval()(tokens)[0])


def test_config_from_state_dict_keeps_base_fields(model):
    cfg = config_from_state_dict(model.state_dict(), base=CFG.model_copy(update={"dropout_prob": 0.25}))
    assert cfg.dropout_prob == 0.25 and cfg.lora_ranks == CFG.lora_ranks and cfg.ffn_dim == 256


def test_inspect_x070(tmp_path, model):
    save_checkpoint(tmp_path / "m.safetensors", model, CFG)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "m.pth")
    for name, dtype in (("m.safetensors", "float32"), ("m.pth", "float16")):
        info = inspect_checkpoint(tmp_path / name)
        assert info["model_type"] == "x070" and info["dtype"] == dtype
        assert (info["n_layer"], info["n_embd"], info["n_head"], info["head_size"]) == (2, 64, 2, 32)
        assert (info["vocab_size"], info["ffn_dim"]) == (71, 256)
        assert (info["lora_rank_decay"], info["lora_rank_iclr"], info["lora_rank_value_residual"],
                info["lora_rank_gate"]) == CFG.lora_ranks
        assert info["num_parameters"] == CFG.num_parameters
        assert info["file_size_mb"] == pytest.approx((tmp_path / name).stat().st_size / 2**20, abs=1e-3)
        assert ModelConfig.model_validate(info["detected_config"]).lora_ranks == CFG.lora_ranks
    assert rwkv_app.inspect_checkpoint(tmp_path / "m.safetensors")["detected_config"]["dropout_prob"] == 0.1


def _x060_state_dict(L=2, C=64, H=2, V=50, F=224, mix=32, decay=64):
    sd = {"emb.weight": torch.randn(V, C), "ln_out.weight": torch.ones(C), "ln_out.bias": torch.zeros(C),
          "head.weight": torch.randn(V, C), "blocks.0.ln0.weight": torch.ones(C), "blocks.0.ln0.bias": torch.zeros(C)}
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2", "att.ln_x"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        for m in ("x", "w", "k", "v", "r", "g"):
            sd[p + "att.time_maa_" + m] = torch.rand(1, 1, C)
        sd[p + "att.time_maa_w1"], sd[p + "att.time_maa_w2"] = torch.zeros(C, mix * 5), torch.zeros(5, mix, C)
        sd[p + "att.time_decay"] = torch.zeros(1, 1, C)
        sd[p + "att.time_decay_w1"], sd[p + "att.time_decay_w2"] = torch.zeros(C, decay), torch.zeros(decay, C)
        sd[p + "att.time_faaaa"] = torch.zeros(H, C // H)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{m}.weight"] = torch.zeros(C, C)
        sd[p + "ffn.time_maa_k"], sd[p + "ffn.time_maa_r"] = torch.rand(1, 1, C), torch.rand(1, 1, C)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = torch.zeros(F, C), torch.zeros(C, F)
        sd[p + "ffn.receptance.weight"] = torch.zeros(C, C)
    return sd


def _x052_state_dict(L=3, C=64, H=4, V=40, F=224):
    sd = {"emb.weight": torch.randn(V, C), "ln_out.weight": torch.ones(C), "ln_out.bias": torch.zeros(C),
          "head.weight": torch.randn(V, C), "blocks.0.ln0.weight": torch.ones(C), "blocks.0.ln0.bias": torch.zeros(C)}
    for i in range(L):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2", "att.ln_x"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = torch.ones(C), torch.zeros(C)
        for m in ("k", "v", "r", "g"):
            sd[p + "att.time_mix_" + m] = torch.rand(1, 1, C)
        sd[p + "att.time_decay"], sd[p + "att.time_faaaa"] = torch.zeros(H, C // H), torch.zeros(H, C // H)
        for m in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{m}.weight"] = torch.zeros(C, C)
        sd[p + "ffn.time_mix_k"], sd[p + "ffn.time_mix_r"] = torch.rand(1, 1, C), torch.rand(1, 1, C)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = torch.zeros(F, C), torch.zeros(C, F)
        sd[p + "ffn.receptance.weight"] = torch.zeros(C, C)
    return sd


def test_inspect_x060_and_x052(tmp_path):
    x060 = {k: v.bfloat16() for k, v in _x060_state_dict().items()}
    torch.save(x060, tmp_path / "v6.pth")
    info = inspect_checkpoint(tmp_path / "v6.pth")
    assert info["model_type"] == "x060" and info["dtype"] == "bfloat16"
    assert (info["n_layer"], info["n_embd"], info["n_head"], info["head_size"], info["vocab_size"]) == (2, 64, 2, 32, 50)
    assert (info["ffn_dim"], info["lora_rank_mix"], info["lora_rank_decay"]) == (224, 32, 64)
    assert info["num_parameters"] == sum(v.numel() for v in x060.values()) and info["detected_config"] is None

    x052 = _x052_state_dict()
    save_file(x052, str(tmp_path / "v5.safetensors"))
    info = inspect_checkpoint(tmp_path / "v5.safetensors")
    assert info["model_type"] == "x052" and info["format"] == "safetensors" and info["dtype"] == "float32"
    assert (info["n_layer"], info["n_embd"], info["n_head"], info["head_size"], info["vocab_size"]) == (3, 64, 4, 16, 40)
    assert info["ffn_dim"] == 224 and info["num_parameters"] == sum(v.numel() for v in x052.values())

    with pytest.raises(UserError, match=r"v6\.pth: an RWKV x060 checkpoint; only RWKV-7"):
        load_model(tmp_path / "v6.pth")


# --------------------------------------------------------------------------------------------- bad input, one by one


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_missing_file_directory_and_garbage(tmp_path):
    assert "nope.pth: checkpoint file not found" in _error(load_model, tmp_path / "nope.pth")
    assert "is a directory" in _error(inspect_checkpoint, tmp_path)
    (tmp_path / "notes.txt").write_text("hello, not weights")
    assert "notes.txt: not a checkpoint" in _error(load_state_dict, tmp_path / "notes.txt")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty.pth: not a checkpoint" in _error(load_model, tmp_path / "empty.pth")


def test_truncated_files(tmp_path, model):
    save_checkpoint(tmp_path / "m.safetensors", model, CFG)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "cut.safetensors: cannot read this safetensors file" in _error(load_state_dict, tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:200])                  # cut inside the JSON header
    assert "head.safetensors: truncated safetensors" in _error(inspect_checkpoint, tmp_path / "head.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pth")
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "cut.pth: cannot read this .pth file" in _error(load_model, tmp_path / "cut.pth")


def test_not_rwkv_and_not_a_state_dict(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    assert "other.pth: not an RWKV checkpoint" in _error(load_model, tmp_path / "other.pth")
    assert "other.pth: not an RWKV checkpoint" in _error(inspect_checkpoint, tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "list.pth: not a state dict" in _error(load_state_dict, tmp_path / "list.pth")


def test_wrong_shapes_missing_and_extra_tensors(tmp_path, model):
    save_checkpoint(tmp_path / "m.safetensors", model, CFG)
    bigger_vocab = CFG.model_copy(update={"vocab_size": 100})
    msg = _error(load_model, tmp_path / "m.safetensors", expect=bigger_vocab)
    assert "m.safetensors" in msg and "`emb.weight` has shape [71, 64]" in msg and "[100, 64]" in msg

    sd = dict(model.state_dict())
    sd["blocks.1.att.key.weight"] = torch.zeros(64, 32)                     # inconsistent with the rest of the file
    torch.save(sd, tmp_path / "bad_shape.pth")
    assert "bad_shape.pth: tensor `blocks.1.att.key.weight` has shape [64, 32]" in _error(
        load_state_dict, tmp_path / "bad_shape.pth")
    sd = dict(model.state_dict())
    del sd["blocks.1.ffn.value.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    assert "missing.pth: missing tensor `blocks.1.ffn.value.weight`" in _error(load_model, tmp_path / "missing.pth")
    sd = dict(model.state_dict(), **{"blocks.1.ffn.s_emb.weight": torch.zeros(3)})
    torch.save(sd, tmp_path / "extra.pth")
    assert "extra.pth: unexpected tensor `blocks.1.ffn.s_emb.weight`" in _error(load_model, tmp_path / "extra.pth")
    sd = {k: v for k, v in model.state_dict().items() if k != "emb.weight"}
    torch.save(sd, tmp_path / "no_emb.pth")
    assert "no_emb.pth: missing tensor `emb.weight`" in _error(inspect_checkpoint, tmp_path / "no_emb.pth")


def test_bad_metadata_config(tmp_path, model):
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={"model_config": json.dumps({"num_cells": "x"})})
    assert "meta.safetensors: invalid `model_config`" in _error(load_state_dict, tmp_path / "meta.safetensors")


def test_integer_tensors_empty_files_and_impossible_shapes(tmp_path, model):
    sd = dict(model.state_dict(), **{"blocks.0.att.k_a": torch.ones(1, 1, 64, dtype=torch.int32)})
    torch.save(sd, tmp_path / "ints.pth")
    assert "ints.pth: tensor `blocks.0.att.k_a` has dtype torch.int32" in _error(load_model, tmp_path / "ints.pth")
    save_file({}, str(tmp_path / "empty.safetensors"))
    assert "empty.safetensors: holds no tensors" in _error(inspect_checkpoint, tmp_path / "empty.safetensors")
    sd = dict(model.state_dict(), **{"blocks.0.att.r_k": torch.zeros(3, 32)})   # 3 heads of 32 != 64 channels
    torch.save(sd, tmp_path / "heads.pth")
    assert "heads.pth: tensor shapes give an invalid model config" in _error(load_state_dict, tmp_path / "heads.pth")
