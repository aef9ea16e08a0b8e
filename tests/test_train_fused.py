"""The compiled training path: the block maths traced by torch.compile give eager's gradients (with and without
gradient checkpointing), and a compiler failure falls back to eager while other errors propagate."""

from __future__ import annotations

import pytest
import torch

from rwkv_app.config import ModelConfig
from rwkv_app.model import RWKV7
from rwkv_app.model.rwkv7 import EAGER_MATHS, CompiledOrEager, prepare_inductor_for_training


def tiny_model() -> RWKV7:
    torch.manual_seed(0)
    model = RWKV7(ModelConfig(num_cells=2, vocab_size=50, embedded_dim=64, num_heads=2, head_size=32)).train()
    with torch.no_grad():
        for p in model.parameters():  # the init has zero output matrices: perturb so every gradient is non-zero
            p.add_(0.05 * torch.randn_like(p))
    return model


def grads(model: RWKV7, tokens: torch.Tensor, maths, recompute: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.grad_checkpoint = recompute
    model._block_maths = lambda x: maths  # what CUDA training gets, here on the CPU
    logits, _ = model(tokens)
    logits.square().mean().backward()
    del model._block_maths
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_traced_block_maths_give_eager_gradients_also_under_checkpointing():
    # aot_eager: dynamo's graph capture and AOTAutograd's joint graph, without inductor's code generation (slow on CI)
    traced = tuple(torch.compile(f, backend="aot_eager", dynamic=False) for f in EAGER_MATHS)
    model = tiny_model()
    tokens = torch.randint(0, 50, (2, 21))
    want = grads(model, tokens, EAGER_MATHS, recompute=False)
    for recompute in (False, True):
        got = grads(model, tokens, traced, recompute)
        assert got.keys() == want.keys()
        for name, g in got.items():
            assert g.shape == want[name].shape, name  # [1, 1, C] parameters keep their shape
            torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)


def test_cpu_training_runs_eagerly():
    model = tiny_model()
    assert model.compile_training and model._block_maths(torch.zeros(1)) is EAGER_MATHS


def test_compiler_failures_fall_back_and_other_errors_propagate(monkeypatch):
    calls = []

    def fn(x):
        calls.append(x)
        return x + 1

    def failing_compile(f, **_):
        def run(*args):
            raise torch._dynamo.exc.Unsupported("no graph for you")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    wrapped = CompiledOrEager(fn, "test fn")
    assert wrapped(1) == 2 and calls == [1] and "no graph for you" in wrapped.error
    assert wrapped(2) == 3  # stays eager without retrying the compiler

    stop = torch.utils.checkpoint._StopRecomputationError  # checkpoint's early stop is control flow, not a failure

    def raising_compile(f, **_):
        def run(*args):
            raise stop()
        return run

    monkeypatch.setattr(torch, "compile", raising_compile)
    wrapped = CompiledOrEager(fn, "test fn")
    with pytest.raises(stop):
        wrapped(1)
    assert wrapped.error is None


def test_training_compiles_turn_mix_order_reduction_off():
    import torch._inductor.config as inductor

    if not hasattr(inductor.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    before = inductor.triton.mix_order_reduction
    try:
        inductor.triton.mix_order_reduction = True
        prepare_inductor_for_training()
        assert inductor.triton.mix_order_reduction is False
    finally:
        inductor.triton.mix_order_reduction = before

