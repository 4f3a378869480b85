"""What a step holds, counted as benchmarks/step_memory.py and rl_memory.py count it (the counters: test_byte_counts.py)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from .conftest import REPO, tiny_module

sys.path.insert(0, str(REPO / "benchmarks"))
from byte_counts import AllocatorPeak, LiveBytes  # noqa: E402
from step_memory import measure, packed_batch, weight_bytes  # noqa: E402


def test_weight_bytes_count_the_4bit_state_as_stored(tiny_qwen):
    """nf4 with double quantization: half a byte per weight, a uint8 absmax per 64 weights, an fp32 absmax per 256
    of those, and each layer's code tables; the rest of the model (embeddings, head, norms, LoRA) as stored."""
    import bitsandbytes as bnb

    module = tiny_module(tiny_qwen, load_in_4bit=True)
    module.build_model(training=True)
    total, trainable = weight_bytes(module.model)
    linear4 = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4
    quantized = {id(m.weight) for m in linear4}
    rest = sum(p.numel() * p.element_size() for p in module.model.parameters() if id(p) not in quantized)
    rest += sum(b.numel() * b.element_size() for b in module.model.buffers())
    nf4 = 0
    for m in linear4:
        n = m.out_features * m.in_features
        nf4 += n // 2 + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256)
    tables = len(linear4) * (16 * 4 + 256 * 4 + 4)  # each layer's own fp32 nf4 code, nested 8-bit code and offset
    assert total == rest + nf4 + tables
    assert trainable == sum(p.numel() * 4 for p in module.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_step_holds_gradients_and_two_adamw_moments_per_trainable_parameter(tiny_qwen, checkpointing):
    module = tiny_module(tiny_qwen, load_in_4bit=True)
    module.model_cfg.gradient_checkpointing = checkpointing
    module.build_model(training=True)
    n = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    r = measure(module, packed_batch(2, 256, module.model.config.vocab_size))
    assert 8 * n <= r["moments"] <= 8 * n + 64  # exp_avg and exp_avg_sq in float32
    assert r["peak"] >= 4 * n + 2 * 256 * 64 * 2  # the fp32 gradients, and more than the two rows' hidden states
    assert math.isfinite(r["loss"])


ROWS, DIM, VOCAB, CHUNK = 768, 64, 4096, 256
PER_CHUNK = CHUNK * VOCAB * (4 + 2)  # float32 logits (softmax in place) + their bf16 cast for the gradient


def head_inputs():
    """Hidden states (bf16, requiring grad), a frozen bf16 LM head, targets: three chunks of rows."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, ROWS, DIM, generator=g).to(torch.bfloat16).requires_grad_()
    head = torch.nn.Linear(DIM, VOCAB, bias=False).to(torch.bfloat16).requires_grad_(False)
    return hidden, head, torch.randint(0, VOCAB, (ROWS,), generator=g)


@pytest.mark.parametrize("count", [LiveBytes, AllocatorPeak])
@pytest.mark.parametrize("grad", [True, False])
def test_the_loss_holds_one_float32_chunk_of_logits_at_a_time(count, grad):
    """The LM head's chunk is the largest transient of a step (1,024 x 151,936 float32 logits = 0.6 GB): the
    logsumexp, the softmax and its gradient are computed in the logits' own memory, so a chunk holds its float32
    logits and their bf16 cast, never two float32 copies (torch.logsumexp makes one inside the op: the allocator's
    count sees it), and nothing of one chunk is alive in the next; validation (no gradient) the same."""
    from medadapt.loss import chunked_cross_entropy

    hidden, head, targets = head_inputs()
    with count() as c:
        loss = chunked_cross_entropy(hidden if grad else hidden.detach(), head, torch.arange(ROWS), targets, chunk=CHUNK)
        if grad:
            loss.backward()
    around = 4 * ROWS * DIM * 2 + 2**16  # the picked rows, their gradient, small vectors
    assert PER_CHUNK <= c.peak <= PER_CHUNK + around


@pytest.mark.parametrize("count", [LiveBytes, AllocatorPeak])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_the_rl_scorer_holds_one_float32_chunk_of_logits_at_a_time(monkeypatch, count, grad, with_entropy):
    """GRPO's scorer (``rl/scoring.py``) keeps, per scored position, the gradient of its log-probability with respect
    to the hidden state, computed in the forward: a chunk holds its float32 logits (logsumexp and softmax in place)
    and their bf16 cast, the entropy for the logs adds a few rows, and the backward recomputes nothing (checkpointed
    chunks held ~5 float32 copies of a chunk while recomputing it: benchmarks/rl_memory.py). The π_old and reference
    passes (no gradient) hold one float32 chunk too."""
    import medadapt.rl.scoring as scoring

    monkeypatch.setattr(scoring, "ENTROPY_ROWS", 16)
    hidden, head, targets = head_inputs()
    with count() as c:
        with torch.set_grad_enabled(grad):
            logp, _ = scoring.chunked_logprobs(hidden, head, torch.arange(ROWS), targets, 0.6, chunk=CHUNK,
                                               with_entropy=with_entropy)
        if grad:
            (logp * torch.linspace(-1, 1, ROWS)).sum().backward()
    around = 4 * ROWS * DIM * 2 + 16 * VOCAB * 4 + 2**16  # picked rows, their gradients, entropy rows, vectors
    lower = PER_CHUNK if grad else CHUNK * VOCAB * 4  # no gradient: no bf16 cast of softmax - one-hot
    assert lower <= c.peak <= PER_CHUNK + around
