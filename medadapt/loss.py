"""Next-token cross-entropy without the full-vocabulary logits, the head's matmul twice per chunk.

A plain causal-LM forward materializes logits for every position: at batch 2 × 2,048 tokens and the R1
vocabulary (151,936) that is 1.25 GB in bf16, 2.5 GB again in float32 for the loss, and as much for the
gradient: the largest activation of a QLoRA step, although only supervised positions need logits. Here
the decoder runs once, the hidden states of the supervised positions are picked (their indices come from
the collate function, on the CPU, so picking them needs no host sync), and the LM head + cross-entropy run
on chunks of them (``FusedLinearCrossEntropy``): each chunk's logits live only while that chunk is computed, and
the gradient with respect to the chunk's hidden states is computed right there, in the forward (softmax − one-hot,
times the head), so backward only scales what was kept. The head's matmul runs twice per chunk (logits, gradient),
where checkpointing each chunk ran it three times (forward, recompute, backward); the head's weight is cast to the
compute dtype once per call, not once per chunk (with a bf16 frozen base it needs no cast at all). A trained head
(``modules_to_save``) gets its weight gradient in the same pass. The sum equals the full computation
(tests/test_loss.py: loss and gradients within 1e-5); ``benchmarks/chunked_loss.py`` measures the peak memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

#: supervised positions per chunk: 1,024 × 151,936 float32 logits = 0.6 GB at a time
CHUNK = 1024
#: float16 (GPUs without bf16): softmax − one-hot is scaled up before its cast, so probabilities below float16's
#: smallest subnormal (6e-8: a 151,936-token vocabulary has many) are not flushed to zero, and scaled back after
FP16_PRESCALE = 1024.0


def supervised_targets(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the hidden states that predict a supervised label (position t predicts t + 1), and
    those labels. Called by the collate function, on the CPU."""
    shifted = labels[:, 1:]
    rows, cols = (shifted != ignore_index).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, shifted[rows, cols]


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the LM head's matmul runs in: autocast's where it is on (as ``F.linear`` would run), else ``t``'s."""
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def cast_for_matmul(d: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """``d`` (float32 softmax − one-hot) cast to the matmul's dtype, and the factor that undoes its scaling. For
    float16, ``d`` is first scaled up by ``FP16_PRESCALE`` in place, so that probabilities below float16's smallest
    subnormal are not flushed to zero."""
    if dtype == torch.float16:
        return d.mul_(FP16_PRESCALE).to(dtype), 1 / FP16_PRESCALE
    return d.to(dtype), 1.0


def log_softmax_at(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0, *, softmax: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(scale × logits)[target] per row of a float32 chunk of logits (one row per position; ``scale``:
    1 / temperature), and the chunk itself, turned in place into the rows' softmax (``softmax=True``) or spent.

    Everything runs in the chunk's own memory. ``torch.logsumexp`` would make a second float32 copy inside the op (it
    computes exp(x − max) out of place: 0.6 GB more per 1,024 × 151,936 chunk, invisible to a count of op outputs;
    tests/test_step_memory.py counts the allocator's bytes), and a separate division by the temperature would be one
    more pass over the chunk."""
    top = logits.amax(dim=-1, keepdim=True)
    picked = (logits.gather(-1, targets[:, None]) - top).squeeze(-1).mul_(scale)
    torch.add(top.mul_(-scale), logits, alpha=scale, out=logits)  # scale × (logits − max), in place
    total = logits.exp_().sum(dim=-1, keepdim=True)
    if softmax:
        logits.div_(total)
    return picked - total.squeeze(-1).log_(), logits


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(h Wᵀ + b, targets) over chunks of rows, gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                chunk: int, dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w = weight.to(dtype)  # once per call
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grads = need_h or need_w or need_b
        for start in range(0, hidden.shape[0], chunk):  # a shape, not a value: no host sync
            h, t = hidden[start : start + chunk].to(dtype), targets[start : start + chunk]
            logp, d = log_softmax_at(F.linear(h, w, b).float(), t, softmax=grads)  # d: their softmax, in place
            total -= logp.sum()
            if grads:
                d[torch.arange(t.shape[0], device=t.device), t] -= 1
                d, unscale = cast_for_matmul(d, dtype)  # the float32 chunk is freed as d becomes its cast
                if need_h:
                    grad_h[start : start + chunk] = (d @ w).mul_(unscale).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(d.t().float(), h.float(), alpha=unscale)
                if need_b:
                    grad_b += d.float().sum(0) * unscale
            del d  # not alive while the next chunk's logits are made
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (next(saved) if present else None for present in ctx.present)
        scale = grad_out.to(torch.float32)
        return (grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * scale).to(ctx.dtypes[0]) if grad_w is not None else None,
                (grad_b * scale).to(ctx.dtypes[1]) if grad_b is not None else None, None, None, None)


def head_linear(head) -> Optional[torch.nn.Linear]:
    """The ``nn.Linear`` an LM head computes with (a PEFT ``modules_to_save`` wrapper resolved to its active copy), or
    None for a head this loss cannot see through (a LoRA on the head, a custom module): that one is checkpointed."""
    if isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear:
        return head
    copies = getattr(head, "modules_to_save", None)
    if copies is not None and hasattr(head, "active_adapters"):
        if getattr(head, "disable_adapters", False):
            inner = head.original_module
        else:
            active = [a for a in head.active_adapters if a in copies]
            inner = copies[active[0]] if active else head.original_module
        return inner if type(inner) is torch.nn.Linear else None
    return None


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head, index: torch.Tensor, targets: torch.Tensor,
                          chunk: Optional[int] = None) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` at the flat positions ``index`` against ``targets``.

    ``hidden``: (batch, length, dim) decoder output; ``head``: the LM head module (a PEFT wrapper is fine).
    """
    chunk = chunk or CHUNK
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    linear = head_linear(head)
    if linear is not None:
        return FusedLinearCrossEntropy.apply(picked, linear.weight, linear.bias, targets, chunk, matmul_dtype(picked))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, index.shape[0], chunk):
        part = picked[start : start + chunk]
        if torch.is_grad_enabled() and part.requires_grad:
            total = total + checkpoint(_chunk_loss, part, targets[start : start + chunk], head, use_reentrant=False)
        else:
            total = total + _chunk_loss(part, targets[start : start + chunk], head)
    return total
