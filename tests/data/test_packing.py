"""Packing must be invisible to the model: same logits and loss as each example alone."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from medadapt.data.packing import IGNORE_INDEX, block_causal_mask, collate, pack


def random_examples(n: int, seed: int = 0, vocab: int = 1000):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 40)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_pack_keeps_every_example_once_within_capacity():
    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    rows = pack(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # best-fit decreasing is near the lower bound on row count
    assert len(rows) <= -(-sum(lengths) // 128) * 1.1 + 1


def test_pack_rejects_overlong():
    with pytest.raises(ValueError):
        pack([10, 200], 128)


def test_collate_positions_segments_and_boundary_labels():
    ex = random_examples(3)
    batch = collate([[ex[0], ex[1]], [ex[2]]], pad_id=0)
    n0, n1 = len(ex[0]["input_ids"]), len(ex[1]["input_ids"])
    assert batch["position_ids"][0, n0].item() == 0  # restarts at the second example
    assert batch["segment_ids"][0, :n0].eq(1).all() and batch["segment_ids"][0, n0 : n0 + n1].eq(2).all()
    assert batch["labels"][0, n0].item() == IGNORE_INDEX  # never predict one example from another
    assert batch["segment_ids"][1, len(ex[2]["input_ids"]) :].eq(0).all()
    assert batch["input_ids"].shape[1] % 8 == 0


def test_mask_is_block_diagonal_causal():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = block_causal_mask(seg, torch.float32)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def summed_loss(model, batch):
    from medadapt.module import CausalLMModule

    module = CausalLMModule.__new__(CausalLMModule)
    torch.nn.Module.__init__(module)
    module.model = model
    return CausalLMModule.loss_sum(module, batch)


@pytest.mark.parametrize("arch", ["tiny_qwen", "tiny_llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(arch, attn, request):
    path = request.getfixturevalue(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    examples = random_examples(6, seed=1)
    with torch.no_grad():
        packed = collate([examples[:3], examples[3:]], pad_id=0)
        unpacked = collate([[e] for e in examples], pad_id=0)
        loss_p, n_p = summed_loss(model, packed)
        loss_u, n_u = summed_loss(model, unpacked)
        assert n_p == n_u
        assert loss_p.item() == pytest.approx(loss_u.item(), rel=1e-5)

        # logits of example 0 do not change when others share its row
        alone = collate([[examples[0]]], pad_id=0)
        mask_alone = block_causal_mask(alone["segment_ids"], torch.float32)
        mask_packed = block_causal_mask(packed["segment_ids"], torch.float32)
        n = len(examples[0]["input_ids"])
        la = model(input_ids=alone["input_ids"], position_ids=alone["position_ids"], attention_mask=mask_alone).logits
        lp = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=mask_packed).logits
        torch.testing.assert_close(lp[0, :n], la[0, :n], atol=1e-5, rtol=1e-5)
        # and the second example of the row, which sees a different prefix if masking leaks
        m = len(examples[1]["input_ids"])
        alone1 = collate([[examples[1]]], pad_id=0)
        l1 = model(input_ids=alone1["input_ids"], position_ids=alone1["position_ids"],
                   attention_mask=block_causal_mask(alone1["segment_ids"], torch.float32)).logits
        torch.testing.assert_close(lp[0, n : n + m], l1[0, :m], atol=1e-5, rtol=1e-5)
