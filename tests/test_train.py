"""The training loop: optimizer recipe, run directory, exact resume, interruption, engines, bad input."""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rwkv_app.config import TrainConfig, validate
from rwkv_app.data.binidx import write_tokens
from rwkv_app.errors import UserError
from rwkv_app.train.optim import LMLoss, learning_rate, lm_loss, param_groups
from rwkv_app.train.run import RunDir, parse_step, sorted_by_step
from rwkv_app.train.trainer import Plan, train

MAX_VALUE = 62  # counting data: values 0..62 -> ids 1..63, id 0 = end of document; vocab 64


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def counting_data(prefix: Path, docs: int = 120, length: int = 20, seed: int = 0) -> int:
    """Documents n, n+1, ..., n+length-1 (as integer-tokenizer ids v + 1) with random starts."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, MAX_VALUE - length + 2, size=docs)
    return write_tokens(prefix, [np.arange(s, s + length) + 1 for s in starts])


def tiny_config(tmp_path: Path, **over) -> TrainConfig:
    model = {"num_cells": 2, "vocab_size": 64, "embedded_dim": 64, "num_heads": 1, **over.pop("model", {})}
    data = dict(experiment_name="t", output_base_path=str(tmp_path / "runs"), dataset_base_path=str(tmp_path),
                filename_without_extensions="count", batch_size_per_device=4, context_length=16,
                mini_epoch_samples=32, num_dataset_repeats=1.0, learning_rate_start=3e-3, learning_rate_end=3e-4,
                warmup_steps=3, device="cpu", use_tui=False, log_every_steps=1, model=model)
    data.update(over)
    return validate(TrainConfig, data, "test.toml", tmp_path)



@pytest.fixture
def counting(tmp_path) -> Path:
    counting_data(tmp_path / "count")
    return tmp_path


# --------------------------------------------------------------------------------------------- optimizer recipe


class StandIn(nn.Module):
    """Parameter names shaped like RWKV-LM's, nothing else."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        att = nn.Module()
        att.w0 = nn.Parameter(torch.zeros(1, 1, 4))
        att.w1 = nn.Parameter(torch.zeros(4, 2))
        att.key = nn.Linear(4, 4, bias=False)
        att.r_k = nn.Parameter(torch.zeros(1, 4))
        block = nn.Module()
        block.att, block.ln1 = att, nn.LayerNorm(4)
        self.blocks = nn.ModuleList([block])
        self.head = nn.Linear(4, 10, bias=False)


def test_param_groups_follow_rwkv_lm():
    model = StandIn()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert got == {"decay": ["blocks.0.att.key.weight", "emb.weight", "head.weight"],
                   "2x": ["blocks.0.att.w0"],
                   "1x": ["blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.ln1.bias", "blocks.0.ln1.weight"]}
    assert (groups["decay"]["weight_decay"], groups["2x"]["lr_scale"], groups["2x"]["weight_decay"]) == (0.1, 2.0, 0.0)
    no_decay = {g["name"]: len(g["params"]) for g in param_groups(model, weight_decay=0.0)}
    assert no_decay == {"1x": 7, "2x": 1}


def test_param_groups_cover_the_real_model_once():
    from rwkv_app.config import ModelConfig
    from rwkv_app.model.rwkv7 import RWKV7

    model = RWKV7(ModelConfig(num_cells=2, vocab_size=50, embedded_dim=64, num_heads=1))
    groups = param_groups(model, 0.001)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    w0 = next(g for g in groups if g["name"] == "2x")["params"]
    assert len(w0) == 2 and all(p.shape == (1, 1, 64) for p in w0)


def test_learning_rate_schedule():
    kw = dict(lr_start=6e-4, lr_end=6e-5, warmup_steps=10, tokens_per_step=100, exit_tokens=10_000)
    assert learning_rate(0, **kw) == pytest.approx(6e-6)  # 1% at the start of warmup
    assert learning_rate(5, **kw) == pytest.approx(6e-4 * (0.01 + 0.99 * 0.5))
    assert learning_rate(10, **kw) == pytest.approx(6e-4)
    middle = 10 + (100 - 10) // 2
    assert learning_rate(middle, **kw) == pytest.approx((6e-4 + 6e-5) / 2)
    assert learning_rate(100, **kw) == pytest.approx(6e-5) == learning_rate(150, **kw)
    lrs = [learning_rate(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_is_cross_entropy_and_l2wrap_pushes_the_argmax(dtype, monkeypatch):
    monkeypatch.setattr(LMLoss, "ROWS", 4)  # several slices: 2 x 5 = 10 rows
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 7) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 7, (2, 5))
    loss = lm_loss(logits, targets)
    ref = logits.detach().double().requires_grad_(True)
    plain = nn.functional.cross_entropy(ref.flatten(0, 1), targets.flatten())
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(plain.item(), rel=1e-6)
    (loss * 0.5).backward()
    (plain * 0.5).backward()
    extra = torch.zeros_like(ref)
    top, where = ref.detach().max(-1, keepdim=True)
    extra.scatter_(-1, where, top * 1e-4 / 10 * 0.5)  # max_logit * 1e-4 / (B*T), scaled like the loss
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.double(), ref.grad + extra, rtol=tol, atol=tol * 1e-2)
    assert not torch.allclose(ref.grad, ref.grad + extra)


def test_build_model_options(tmp_path):
    from rwkv_app.train.trainer import build_model
    import torch._dynamo as dynamo

    cfg = tiny_config(tmp_path, compile=True, grad_checkpoint=True, model={"num_cells": 6})
    model = build_model(cfg.arch, cfg)
    assert model.training and model.grad_checkpoint and dynamo.config.recompile_limit >= 12
    again = build_model(cfg.arch, cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_plan_counts_steps_and_refuses_a_batch_that_does_not_divide(tmp_path):
    cfg = tiny_config(tmp_path, num_dataset_repeats=2.5, gradient_accumulation_steps=2)
    plan = Plan.of(cfg, dataset_tokens=1000, world_size=1)
    assert plan.tokens_per_step == 4 * 2 * 16 and plan.exit_tokens == 2500
    assert plan.total_steps == math.ceil(2500 / 128) and plan.steps_per_mini_epoch == 4
    odd = tiny_config(tmp_path, mini_epoch_samples=20, gradient_accumulation_steps=2)
    assert "must be a multiple" in error_of(Plan.of, odd, 1000, 1)


# ------------------------------------------------------------------------------------------------ run directory


def test_newest_checkpoint_is_chosen_by_step_number_not_by_name(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    for name in ("step-9", "step-10", "step-00000002"):
        (run.state_dir / name).mkdir()
        (run.state_dir / name / "trainer.pt").write_bytes(b"x")
    (run.state_dir / "step-99").mkdir()  # incomplete: no trainer.pt
    assert [s for s, _ in run.states()] == [2, 9, 10] and run.latest_state()[0] == 10
    assert parse_step("step-00000123.safetensors") == 123 and parse_step("final.safetensors") is None
    assert [p.name for p in sorted_by_step(map(Path, ["step-10.x", "step-9.x", "init.x"]))] == \
        ["init.x", "step-9.x", "step-10.x"]
    run.prune_states(2)
    assert [s for s, _ in run.states()] == [9, 10]


def test_a_failure_inside_a_state_write_leaves_the_previous_state(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_state(5, lambda d: (d / "trainer.pt").write_bytes(b"good"))

    def crash(folder: Path) -> None:
        (folder / "trainer.pt").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        run.write_state(6, crash)
    assert run.latest_state() == (5, run.state_path(5))
    assert (run.state_path(5) / "trainer.pt").read_bytes() == b"good"
    assert not any(p.name.startswith(".tmp") for p in run.state_dir.iterdir())


# ------------------------------------------------------------------------------------------------- training runs


def test_a_model_trained_on_counting_predicts_the_next_number(counting):
    cfg = tiny_config(counting, num_dataset_repeats=12.0, context_length=32, batch_size_per_device=8,
                      mini_epoch_samples=64, learning_rate_start=1e-2, learning_rate_end=1e-3, log_every_steps=20)
    result = train(cfg, progress=False)
    assert not result.interrupted and result.step == result.total_steps
    from rwkv_app.model.checkpoint import load_model

    model = load_model(result.weights)
    rng = np.random.default_rng(123)
    starts = rng.integers(0, MAX_VALUE - 8, size=40)
    prompts = torch.tensor(np.stack([np.arange(s, s + 6) + 1 for s in starts]))
    with torch.no_grad():
        logits, _ = model(prompts)
    predicted = logits[:, -1].argmax(-1)
    accuracy = (predicted == prompts[:, -1] + 1).float().mean().item()
    assert accuracy >= 0.9, accuracy
    run = RunDir(result.run_dir)
    records = run.read_metrics()
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens"} <= set(records[-1])
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert run.final_weights_path.is_file() and run.plot_path.read_bytes()[:4] == b"\x89PNG"
    epoch_lines = [ln for ln in run.train_log_path.read_text().splitlines() if ln[:1].isdigit()]
    assert len(epoch_lines) == math.ceil(result.total_steps / 8)


def test_training_2n_steps_equals_n_then_resume_then_n(counting):
    over = dict(gradient_accumulation_steps=2, mini_epoch_samples=32, model={"dropout_prob": 0.1},
                num_dataset_repeats=0.6)
    straight = train(tiny_config(counting, experiment_name="straight", **over), progress=False)
    n = straight.total_steps // 2
    assert straight.total_steps == 12 and n % 4  # the stop lands inside a mini-epoch of 4 steps

    cfg = tiny_config(counting, experiment_name="split", **over)
    first = train(cfg, max_steps=n, progress=False)
    assert first.interrupted and first.step == n
    assert "unfinished run" in error_of(train, cfg, progress=False)
    second = train(cfg, resume=True, progress=False)
    assert not second.interrupted and second.step == straight.total_steps
    assert {**first.losses, **second.losses} == straight.losses  # bit for bit

    a = RunDir(straight.run_dir)
    b = RunDir(second.run_dir)
    assert [r["loss"] for r in a.read_metrics()] == [r["loss"] for r in b.read_metrics()]
    epochs = lambda run: [ln.split()[:2] for ln in run.train_log_path.read_text().splitlines() if ln[:1].isdigit()]
    assert epochs(a) == epochs(b)
    from safetensors.torch import load_file

    wa, wb = load_file(a.final_weights_path), load_file(b.final_weights_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ctrl_c_saves_and_a_crash_inside_a_checkpoint_write_keeps_the_last_good_one(counting, monkeypatch):
    cfg = tiny_config(counting, num_dataset_repeats=0.4, save_every_steps=2)

    def interrupt(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(cfg, on_log=interrupt, progress=False)
    assert stopped.interrupted and stopped.step == 3  # the step under way when Ctrl-C came is finished first
    run = RunDir(stopped.run_dir)
    assert run.latest_state()[0] == 3 and run.weights_path(3).is_file()

    import rwkv_app.train.engine as engine_mod

    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if "step-00000006" in str(path):
            Path(path).write_bytes(b"torn")  # the process "dies" half-way through the state file
            raise SystemExit("killed")
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(engine_mod.torch, "save", dying_save)
    with pytest.raises(SystemExit):
        train(cfg, resume=True, progress=False)
    monkeypatch.setattr(engine_mod.torch, "save", real_save)
    assert run.latest_state()[0] == 4  # step 6's state never appeared; 4 is whole
    done = train(cfg, resume=True, progress=False)
    assert not done.interrupted and done.step == done.total_steps
    assert min(done.losses) == 5  # resumed after step 4


def test_deepspeed_zero_runs_on_the_cpu_and_matches_the_plain_engine(counting):
    pytest.importorskip("deepspeed")
    over = dict(gradient_accumulation_steps=2, mini_epoch_samples=16, num_dataset_repeats=0.2)
    plain = train(tiny_config(counting, experiment_name="plain", **over), progress=False)
    cfg = tiny_config(counting, experiment_name="zero", strategy="deepspeed_stage_2", **over)
    half = train(cfg, max_steps=2, progress=False)
    rest = train(cfg, resume=True, progress=False)
    assert rest.step == plain.step == 4
    zero = {**half.losses, **rest.losses}
    assert zero.keys() == plain.losses.keys()
    for step, loss in plain.losses.items():
        assert zero[step] == pytest.approx(loss, rel=1e-4)
    assert any((RunDir(rest.run_dir).latest_state()[1]).rglob("*optim_states.pt"))


def test_start_from_an_rwkv_lm_pth_and_refuse_another_vocab(counting):
    from rwkv_app.model.checkpoint import export_pth, load_state_dict

    cfg = tiny_config(counting, experiment_name="src", num_dataset_repeats=0.3)
    src = train(cfg, progress=False)
    pth = counting / "export.pth"
    export_pth(src.weights, pth)
    tuned = train(tiny_config(counting, experiment_name="tuned", num_dataset_repeats=0.3, init_weights_path=str(pth)),
                  progress=False)
    init, _ = load_state_dict(RunDir(tuned.run_dir).init_weights_path)
    start, _ = load_state_dict(src.weights)
    assert all(torch.equal(init[k].float(), start[k].float()) for k in start)

    wide = tiny_config(counting, experiment_name="wide", init_weights_path=str(pth), model={"vocab_size": 80})
    assert "vocab_size 64" in error_of(train, wide, progress=False)
    deep = tiny_config(counting, experiment_name="deep", init_weights_path=str(pth), model={"num_cells": 3})
    assert "num_cells = 2" in error_of(train, deep, progress=False)


def test_trains_on_the_rwkv_rs_dataset_format(tmp_path):
    rng = np.random.default_rng(0)
    write_tokens(tmp_path / "count", [np.arange(s, s + 20) + 1 for s in rng.integers(0, 40, 60)], fmt="rwkv")
    result = train(tiny_config(tmp_path, dataset_format="rwkv", num_dataset_repeats=0.3), progress=False)
    assert result.step == result.total_steps == math.ceil(0.3 * 60 * 21 / 64)


def test_bad_input_is_one_line_and_writes_nothing(counting, monkeypatch):
    assert "no training state" in error_of(train, tiny_config(counting, experiment_name="r"), resume=True)
    assert "too few for context_length" in error_of(train, tiny_config(counting, context_length=2000))
    assert "vocab_size is 40" in error_of(train, tiny_config(counting, model={"vocab_size": 40}))
    assert "tf32" in error_of(train, tiny_config(counting, precision="tf32"))
    assert "no `dataset_sources`" in error_of(train, tiny_config(counting, filename_without_extensions="missing"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "torchrun" in error_of(train, tiny_config(counting))
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert "pip install deepspeed" in error_of(train, tiny_config(counting, strategy="deepspeed_stage_1"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error_of(train, tiny_config(counting, device="cuda"))
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install tensorboard" in error_of(train, tiny_config(counting, tensorboard=True))
    if importlib.util.find_spec("wandb") is None:
        wandb = tiny_config(counting, upload_to_wandb=True, wandb_project_name="p")
        assert "pip install wandb" in error_of(train, wandb)
    runs = counting / "runs"
    assert not runs.exists() or not any(runs.rglob("*.safetensors"))


def test_deepspeed_config_keeps_bf16_autocast_and_fp32_reductions(tmp_path):
    from rwkv_app.train.engine import Placement, deepspeed_config

    cfg = tiny_config(tmp_path, strategy="deepspeed_stage_2", gradient_accumulation_steps=2, gradient_clip_val=0.5)
    bf16 = deepspeed_config(cfg, Placement(device=torch.device("cpu"), world_size=2, autocast_dtype=torch.bfloat16))
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert (bf16["train_batch_size"], bf16["gradient_clipping"], bf16["zero_optimization"]["stage"]) == (16, 0.5, 2)
    fp32 = deepspeed_config(cfg, Placement(device=torch.device("cpu")))
    assert "torch_autocast" not in fp32
