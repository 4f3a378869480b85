"""Cross-entropy without full logits equals the full computation: loss and every gradient (1e-5 of their scale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medadapt.data.packing import IGNORE_INDEX, collate
from medadapt.loss import chunked_cross_entropy
from medadapt.model import LoraConfig, ModelConfig, load_model

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
    got = grads()
    assert batch["targets"].shape[0] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > chunk or chunk > 7
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        assert_close_to_scale(got[name], expected[name], msg=name)
