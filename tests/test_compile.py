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


@pytest.fixture(scope="module")
def cpu_varlen_kernel():
    register_cpu_varlen_kernel()


def register_cpu_varlen_kernel():
    """CPU kernels for torch's varlen op (``torch_attn::_varlen_attn`` and its backward), which has CUDA kernels only,
    so that medadapt's CUDA attention path runs here as written, through the op as torch defines it."""
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (defines the ops)

    def forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
                enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        from medadapt.attention import _segments_sdpa  # the CPU path's own segment attention: the glue is compared

        assert is_causal and (scale is None or scale == query.shape[-1] ** -0.5)
        out = _segments_sdpa(query, key, value, cu_seq_q, scale, query.shape[1] // key.shape[1])
        return out, torch.zeros(query.shape[1], query.shape[0]), torch.zeros(2, dtype=torch.uint64)

    def backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state, scale,
                 window_size):  # attention's gradient by hand (autograd does not run inside a kernel), in float32
        groups = query.shape[1] // key.shape[1]
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32) for t in (query, key, value))
        bounds = cu_seq_q.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            q, k, v, do = (t[s:e].float().transpose(0, 1) for t in (query, key.repeat_interleave(groups, 1),
                                                                    value.repeat_interleave(groups, 1), grad_out))
            scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            probs = scores.softmax(-1)
            dprobs = do @ v.transpose(1, 2)
            dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
            dq[s:e] = (dscores @ k).transpose(0, 1)
            heads = (dscores.transpose(1, 2) @ q, probs.transpose(1, 2) @ do)  # (H, n, D) for k and v
            for grad, part in zip((dk, dv), heads):
                grad[s:e] = part.view(key.shape[1], groups, e - s, -1).sum(1).transpose(0, 1)
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)

    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", forward)
    torch.library.register_kernel("torch_attn::_varlen_attn_backward", "cpu", backward)


SHAPES = [(8, 3, 2), (20, 3, 2), (40, 2, 2), (60, 4, 1), (80, 3, 2), (100, 2, 3), (120, 1, 1), (140, 5, 3)]
VALIDATION = 5  # the batch that runs as validation: eval mode, no gradients


def first_steps(path, monkeypatch, *, compile_, kernel, checkpointing, dropout):
    """fit's first steps on the varlen path: the compile probe, training batches of other lengths and segment counts,
    a validation pass. Returns each training batch's loss and gradients, the graph count after each batch, breaks."""
    from medadapt import attention

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(attention, "kernel_runs", lambda q: kernel)
    batches = [collate([random_examples(a, seed=s), random_examples(b, seed=s + 1)], pad_id=0) for s, a, b in SHAPES]
    m = built_module(ModelConfig(name_or_path=path, load_in_4bit=False, compute_dtype="float32",
                                 attn_implementation="varlen", gradient_checkpointing=checkpointing, compile=compile_),
                     LoraConfig(r=8, alpha=16, dropout=dropout))
    if compile_:
        m.settle_compile(batches[0])
    out, graphs = [], []
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        if i == VALIDATION:
            m.model.eval()
            with torch.no_grad():
                m.loss_sum(batch)
            m.model.train()
        else:
            m.model.zero_grad(set_to_none=True)
            loss, _ = m.loss_sum(batch)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
        graphs.append(counters["stats"]["unique_graphs"])
    return out, graphs, sum(counters["graph_break"].values())


def compiled_like_fit(graphs: list[int], breaks: int) -> None:
    """No graph break, and compilations that stopped once the varying dimensions went dynamic, well inside the
    recompile limit (past it, dynamo runs the layers eager for good)."""
    from medadapt.model import RECOMPILE_LIMIT

    assert breaks == 0, f"{breaks} graph breaks"
    assert len(set(graphs[-3:])) == 1 and graphs[-1] <= RECOMPILE_LIMIT // 4, graphs  # stopped, with room


@pytest.mark.slow
def test_compiled_checkpointed_layers_with_shared_dropout_masks_run_the_cuda_varlen_path_whole(tiny_qwen, monkeypatch,
                                                                                                cpu_varlen_kernel):
    """On CUDA, training attention is torch's flash varlen op inside each compiled layer, with the flattened batch's
    boundaries and a Python-int longest segment. Run on CPU through the same code (a CPU kernel for the op) as fit
    runs the first steps, with checkpointing and the recipe's LoRA dropout (masks shared by sibling projections):
    the shared masks had mutated state outside checkpointing's region, a graph break that left every checkpointed
    layer eager."""
    _, graphs, breaks = first_steps(tiny_qwen, monkeypatch, compile_=True, kernel=True, checkpointing=True,
                                    dropout=0.05)
    compiled_like_fit(graphs, breaks)


@pytest.mark.slow
def test_the_cuda_varlen_path_compiled_gives_the_eager_and_sdpa_loss_and_gradients(tiny_qwen, monkeypatch,
                                                                                   cpu_varlen_kernel):
    """The same first steps without checkpointing (layer 0's input then needs no gradient: its own graphs; dropout 0,
    as inductor draws its own masks): compiled as fit compiles, compiled = eager on the kernel path, and the kernel
    path = the sdpa path (the glue: layout, boundaries, GQA; attention in bf16, as flash runs it)."""
    sdpa, eager, (compiled, graphs, breaks) = (
        first_steps(tiny_qwen, monkeypatch, compile_=compile_, kernel=kernel, checkpointing=False, dropout=0.0)
        for compile_, kernel in ((False, False), (False, True), (True, True)))
    compiled_like_fit(graphs, breaks)
    tolerance = 4 * 2**-8  # flash kernels have no float32: the kernel path runs attention in bf16
    for (l0, g0), (l1, g1), (l2, g2) in zip(sdpa[0], eager[0], compiled):
        assert_close_to_scale(l1, l0, rtol=tolerance)
        assert_gradients_close(g1, g0, rtol=tolerance)
        assert_close_to_scale(l2, l1, rtol=tolerance)
        assert_gradients_close(g2, g1, rtol=tolerance)
