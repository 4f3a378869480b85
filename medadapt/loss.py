"""Next-token cross-entropy without the full-vocabulary logits.

A plain causal-LM forward materializes logits for every position: at batch 2 × 2,048 tokens and the R1
vocabulary (151,936) that is 1.25 GB in bf16, 2.5 GB again in float32 for the loss, and as much for the
gradient: the largest activation of a QLoRA step, although only supervised positions need logits. Here
the decoder runs once, the hidden states of the supervised positions are picked (their indices come from
the collate function, on the CPU, so picking them needs no host sync), and the LM head + cross-entropy run
on chunks of them under activation checkpointing: each chunk's logits live only while that chunk is
computed, forward and backward. The sum equals the full computation (tests/test_loss.py: loss and
gradients within 1e-5); ``benchmarks/chunked_loss.py`` measures the peak memory of both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: supervised positions per chunk: 1,024 × 151,936 float32 logits = 0.6 GB at a time
CHUNK = 1024


def supervised_targets(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the hidden states that predict a supervised label (position t predicts t + 1), and
    those labels. Called by the collate function, on the CPU."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != ignore_index).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, shifted[rows, cols]


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head, index: torch.Tensor, targets: torch.Tensor,
                          chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` at the flat positions ``index`` against ``targets``.

    ``hidden``: (batch, length, dim) decoder output; ``head``: the LM head module (a PEFT wrapper is fine).
    """
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, index.shape[0], chunk):  # a shape, not a value: no host sync
        part = picked[start : start + chunk]
        if torch.is_grad_enabled() and part.requires_grad:
            total = total + checkpoint(_chunk_loss, part, targets[start : start + chunk], head, use_reentrant=False)
        else:
            total = total + _chunk_loss(part, targets[start : start + chunk], head)
    return total
