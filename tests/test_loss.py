"""Cross-entropy without full logits equals the full computation: loss and every gradient (1e-5 of their scale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medadapt.data.packing import IGNORE_INDEX, collate
from medadapt.loss import chunked_cross_entropy
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig

from .conftest import assert_close_to_scale, random_examples


@pytest.mark.parametrize("chunk", [7, 1024])
def test_chunked_loss_and_gradients_equal_the_full_logits(tiny_qwen, chunk):
    cfg = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", gradient_checkpointing=True)
    torch.manual_seed(0)
    model = load_model(cfg, LoraConfig(r=8, alpha=16, dropout=0.0), training=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)  # a trained-looking adapter: gradients reach A and B
    batch = collate([random_examples(3, seed=2), random_examples(2, seed=3)], pad_id=0)
    full, chunked, expected, got = full_and_chunked(model, batch, chunk)
    assert batch["targets"].shape[0] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > chunk or chunk > 7
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        assert_close_to_scale(got[name], expected[name], msg=name)


def full_and_chunked(model, batch, chunk):
    """Gradients (by name) of the full-logits loss and of the chunked one, and the two losses."""
    base = model.get_base_model()

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    full = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    full.backward()
    expected = grads()
    hidden = base.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).last_hidden_state
    chunked = chunked_cross_entropy(hidden, base.get_output_embeddings(), batch["target_index"], batch["targets"],
                                    chunk=chunk)
    chunked.backward()
    return full.detach(), chunked.detach(), expected, grads()


def test_a_trained_head_gets_its_weight_gradient_in_the_same_pass(tiny_qwen):
    """CPT trains the embeddings and the head in full (``modules_to_save``): the head's weight gradient, computed
    chunk by chunk in the loss's forward, equals the full computation's (1e-5 of the gradient's scale)."""
    from .conftest import assert_gradients_close

    cfg = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", gradient_checkpointing=False)
    torch.manual_seed(0)
    model = load_model(cfg, LoraConfig(r=8, alpha=16, dropout=0.0, modules_to_save=["lm_head"]), training=True)
    batch = collate([random_examples(3, seed=6)], pad_id=0)
    full, chunked, expected, got = full_and_chunked(model, batch, 5)
    assert any("lm_head" in n for n in got) and chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert_gradients_close(got, expected, rtol=1e-5)


def test_the_head_runs_twice_per_chunk(tiny_qwen):
    """The frozen head's matmul runs twice per chunk (logits; their gradient, in the forward), not three times
    (forward, checkpoint recompute, backward): counted on the aten matmuls whose operand is the head's weight."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", gradient_checkpointing=False)
    model = load_model(cfg, LoraConfig(r=8, alpha=16, dropout=0.0), training=True)
    head = model.get_base_model().get_output_embeddings()
    batch = collate([random_examples(4, seed=7)], pad_id=0)
    hidden = model.get_base_model().get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                                  use_cache=False).last_hidden_state
    vocab = head.weight.shape[0]

    class CountHeadMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "linear", "matmul") and any(
                    isinstance(a, torch.Tensor) and vocab in a.shape for a in args):
                CountHeadMatmuls.count += 1
            return func(*args, **(kwargs or {}))

    chunk = 6
    chunks = -(-batch["targets"].shape[0] // chunk)
    with CountHeadMatmuls():
        chunked_cross_entropy(hidden, head, batch["target_index"], batch["targets"], chunk=chunk).backward()
    assert chunks > 1 and CountHeadMatmuls.count == 2 * chunks


def test_the_float16_path_equals_the_full_computation_within_float16_precision():
    """``16-mixed`` (GPUs without bf16) runs the head in float16: softmax − one-hot is scaled up before its cast and
    back after, for the hidden states', the head weight's and the bias's gradients. Against the full computation in
    float64 on the same float16 values: within 1e-2 of each gradient's scale (float16 keeps ~3 decimal digits; its
    logits are rounded to ~1e-3 of their size), and a wrong scale is off by 1,024x."""
    g = torch.Generator().manual_seed(0)
    rows, dim, vocab = 40, 32, 512
    hidden = (torch.randn(rows, dim, generator=g)).to(torch.float16)
    head = torch.nn.Linear(dim, vocab).to(torch.float16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g) * 0.8)  # logits ~ N(0, 4.5): tiny probabilities too
    targets = torch.randint(0, vocab, (rows,), generator=g)
    h = hidden.clone().requires_grad_()
    loss = chunked_cross_entropy(h[None], head, torch.arange(rows), targets, chunk=16)
    loss.backward()
    got = {"hidden": h.grad.double(), "weight": head.weight.grad.double(), "bias": head.bias.grad.double()}
    h64 = hidden.double().requires_grad_()
    w64, b64 = head.weight.detach().double().requires_grad_(), head.bias.detach().double().requires_grad_()
    full = F.cross_entropy(F.linear(h64, w64, b64), targets, reduction="sum")
    full.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-2)
    for name, expected in (("hidden", h64.grad), ("weight", w64.grad), ("bias", b64.grad)):
        assert_close_to_scale(got[name], expected, rtol=1e-2, msg=name)
