"""``model.compile``: compiled decoder layers train exactly as eager ones (CPU, fp32), and ``auto`` falls back to eager
with one line when compiling fails."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from medadapt.data.packing import collate
from medadapt.model import is_compiled
from medadapt.model_config import LoraConfig, ModelConfig

from .conftest import assert_close_to_scale, assert_gradients_close, built_module, random_examples


def module(path, compile_, nf4=False):
    return built_module(ModelConfig(name_or_path=path, load_in_4bit=nf4, compute_dtype="float32",
                                    gradient_checkpointing=True, compile=compile_), LoraConfig(r=8, alpha=16, dropout=0.0))


@pytest.mark.slow
@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
def test_compiled_layers_give_the_eager_loss_and_gradients(tiny_qwen, nf4):
    """fp32 weights, and the 4-bit base (bitsandbytes' nf4 matmul traced through, as on CUDA) under compiled layers."""
    batch = collate([random_examples(3, seed=8), random_examples(2, seed=9)], pad_id=0)
    results = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        counters.clear()
        m = module(tiny_qwen, compile_, nf4)
        assert is_compiled(m.model) == compile_
        loss, _ = m.loss_sum(batch)
        loss.backward()
        if compile_:  # regional: one graph for every layer, nothing falls back to eager inside it
            assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
    assert_close_to_scale(results[1][0], results[0][0], rtol=1e-5)
    assert_gradients_close(results[1][1], results[0][1], rtol=1e-5)


def test_auto_is_off_on_cpu_and_a_failing_compile_falls_back_to_eager(tiny_qwen, monkeypatch, caplog):
    assert not is_compiled(module(tiny_qwen, "auto").model)  # CPU: auto stays eager
    m = module(tiny_qwen, True)
    m.resolved_model_cfg = m.resolved_model_cfg.__class__(**{**m.resolved_model_cfg.__dict__, "compile": "auto"})
    m._compile_pending = True

    def broken(*args, **kwargs):
        raise RuntimeError("backend compiler failed: no kernel for this op")

    for layer in m.model.get_base_model().get_decoder().layers:
        monkeypatch.setattr(layer, "_compiled_call_impl", broken)
    batch = collate([random_examples(2, seed=1)], pad_id=0)
    with caplog.at_level("WARNING"):
        m.settle_compile(batch)
    assert "compiling the decoder layers failed (RuntimeError: backend compiler failed" in caplog.text
    assert not is_compiled(m.model) and all(p.grad is None for p in m.model.parameters())
    loss, _ = m.loss_sum(batch)  # eager from here
    assert torch.isfinite(loss)
