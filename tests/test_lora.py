"""medadapt's LoRA training forward (``medadapt/lora.py``) against PEFT's: the same outputs and gradients at dropout 0
(to fp32 rounding), one dropout mask per shared input with the recipe's rate, masks replayed by activation
checkpointing, and no dropout on frozen stacked adapters."""

from __future__ import annotations

import pytest
import torch

from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig

from .conftest import assert_close_to_scale, assert_gradients_close


def build(path, fused: bool, dropout: float = 0.0, load_in_4bit: bool = False, base_adapters=(), seed: int = 0,
          checkpointing: bool = False):
    torch.manual_seed(seed)
    model = load_model(ModelConfig(name_or_path=path, load_in_4bit=load_in_4bit, compute_dtype="float32",
                                   gradient_checkpointing=checkpointing, base_adapters=list(base_adapters)),
                       LoraConfig(r=4, alpha=8, dropout=dropout, fused=fused), training=True)
    with torch.no_grad():  # a LoRA that is not zero, so its path is compared too
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(name) % 2**31)) * 0.05)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_the_fused_forward_equals_peft_s_at_dropout_zero(tiny_qwen, load_in_4bit):
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(1))
    peft_loss, peft_grads = loss_and_grads(build(tiny_qwen, False, load_in_4bit=load_in_4bit), ids)
    ours_loss, ours_grads = loss_and_grads(build(tiny_qwen, True, load_in_4bit=load_in_4bit), ids)
    assert_close_to_scale(ours_loss, peft_loss, rtol=1e-6)
    assert_gradients_close(ours_grads, peft_grads, rtol=1e-5)


def lora_inputs(monkeypatch):
    """Record what each trained LoRA A receives (the dropped input), by projection."""
    import medadapt.lora as lora

    seen, original = {}, lora.dropped_input

    def recording(layer, x, adapter):
        out = original(layer, x, adapter)
        seen.setdefault(layer._medadapt_name, out)
        return out

    monkeypatch.setattr(lora, "dropped_input", recording)
    return seen


def test_siblings_share_one_mask_at_the_recipe_s_rate(tiny_qwen, monkeypatch):
    """q/k/v take one dropped copy of their common input, gate/up another; o and down their own; each at rate p."""
    model = build(tiny_qwen, True, dropout=0.3)
    seen = lora_inputs(monkeypatch)
    model(input_ids=torch.randint(0, 5000, (4, 64), generator=torch.Generator().manual_seed(2)))
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"] and seen["gate_proj"] is seen["up_proj"]
    assert seen["q_proj"] is not seen["gate_proj"] and seen["o_proj"] is not seen["q_proj"]
    for key in ("q_proj", "gate_proj", "o_proj", "down_proj"):
        zeros = float((seen[key] == 0).float().mean())
        assert 0.25 < zeros < 0.35, (key, zeros)  # p = 0.3 of the input dropped (4 x 64 x 64+ values)


def test_checkpointing_replays_the_shared_masks(tiny_qwen):
    """With dropout on, the same seed gives the same loss and gradients with and without activation checkpointing:
    the recompute draws the masks forward drew (a mismatch would train on gradients of another network)."""
    from medadapt.checkpointing import set_checkpointing

    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for on in (False, True):
        model = build(tiny_qwen, True, dropout=0.2, checkpointing=True)
        set_checkpointing(model, on)
        torch.manual_seed(7)
        results.append(loss_and_grads(model, ids))
    assert_close_to_scale(results[1][0], results[0][0], rtol=1e-6)
    assert_gradients_close(results[1][1], results[0][1], rtol=1e-5)


def test_frozen_stacked_adapters_get_no_dropout(tiny_qwen, tmp_path):
    """A stacked (frozen) adapter is part of the model being trained on: in training mode it computes what it
    computes in eval mode; only the trained LoRA is dropped out."""
    from medadapt.weights import write_scaled_adapter

    base = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[])
    write_scaled_adapter(base, tmp_path / "cpt", rho=0.05, lora=LoraConfig(r=4, alpha=8, dropout=0.5))
    model = build(tiny_qwen, True, dropout=0.0, base_adapters=[str(tmp_path / "cpt")])
    ids = torch.randint(0, 5000, (2, 16))
    with torch.no_grad():
        train_mode = model(input_ids=ids).logits
        model.eval()
        eval_mode = model(input_ids=ids).logits
    assert torch.equal(train_mode, eval_mode)


def test_the_frozen_base_stays_in_the_compute_dtype_and_trains_like_the_upcast_one(tiny_qwen):
    """``frozen_dtype: compute`` (default): a 4-bit training build keeps its frozen embeddings, norms and head in bf16,
    LoRA weights in float32; loss and LoRA gradients equal those of the fp32-upcast build (PEFT's preparation, the
    previous default) within bf16 precision of their scale (2^-8 per rounding; 4x for the few roundings a 2-layer
    model adds up)."""
    from medadapt.data.packing import collate

    from .conftest import built_module

    def module(frozen):
        return built_module(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=True, compute_dtype="bfloat16",
                                        gradient_checkpointing=False, frozen_dtype=frozen, compile=False),
                            LoraConfig(r=4, alpha=8, dropout=0.0), std=0.05)

    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": torch.randint(0, 5000, (n,), generator=g).tolist()} for n in (20, 28)]
    for ex in examples:
        ex["labels"] = list(ex["input_ids"])
    batch = collate([examples], pad_id=0)
    results = {}
    for frozen in ("compute", "float32"):
        m = module(frozen)
        frozen_dtypes = {p.dtype for n, p in m.model.named_parameters()
                         if not p.requires_grad and p.dtype.is_floating_point}
        assert {p.dtype for p in m.model.parameters() if p.requires_grad} == {torch.float32}
        assert frozen_dtypes == ({torch.bfloat16} if frozen == "compute" else {torch.float32})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = m.loss_sum(batch)
        (loss / n).backward()
        results[frozen] = (float(loss / n), {k: p.grad.float() for k, p in m.model.named_parameters() if p.grad is not None})
    tolerance = 4 * 2**-8
    assert results["compute"][0] == pytest.approx(results["float32"][0], rel=tolerance)
    assert_gradients_close(results["compute"][1], results["float32"][1], rtol=tolerance)
