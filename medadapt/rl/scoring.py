"""Log-probabilities of sampled completions at the sampling temperature, without full-vocabulary logits for a step.

A GRPO step scores every completion token of its rollout batch three times (policy with gradients, π_old, the
reference). Computing ``log_softmax(head(hidden))`` for all of them at once keeps 4 bytes × 151,936 per completion
token for backward: 16 completions × 2,000 tokens held 18 GiB. Here the rollout is scored in micro-batches of
completions (each back-propagated before the next is built, ``rl/module.py``), and within a micro-batch the LM
head runs on chunks of the scored positions as the SFT loss does (``loss.py``): the gradient of each log-probability
with respect to its hidden state, ``(onehot − softmax) W / T``, is computed in the forward chunk and kept (hidden
size per position), so a chunk's logits live only while it is computed, hold one float32 copy, and the head's
matmul runs twice per chunk instead of three times (forward, checkpoint recompute, backward). Peak memory grows with
the micro-batch's tokens × hidden size, not with the step's tokens × vocabulary (``benchmarks/rl_memory.py``).

Every log-probability is of ``logits / temperature``: the distribution the rollout was sampled from (no top-k or
top-p truncation is applied to the score, as in TRL: within the kept set they only renormalise).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medadapt.loss import CHUNK, cast_for_matmul, head_linear, log_softmax_at, matmul_dtype
from medadapt.model import unwrapped


@contextmanager
def reference_policy(model):
    """The model with its trained LoRA (``default``) off and any adapters stacked under it still on: base + the frozen
    adapters, the policy RL started from. (Only LoRA layers switch; ``rl/module.py`` refuses a trained LoRA with
    ``modules_to_save``, whose copies would stay on.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    try:
        for m, active in zip(layers, saved):
            m._active_adapter = [a for a in ([active] if isinstance(active, str) else active) if a != "default"]
        yield model
    finally:
        for m, active in zip(layers, saved):
            m._active_adapter = active


#: rows of a chunk whose entropy is summed at once (128 × 151,936 float32 = 78 MB of temporary)
ENTROPY_ROWS = 128


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Σ −p log p over rows of softmax probabilities, a few rows at a time, so its temporary is no second chunk."""
    entropy = p.new_zeros((), dtype=torch.float32)
    for row in range(0, p.shape[0], ENTROPY_ROWS):
        entropy += torch.special.entr(p[row : row + ENTROPY_ROWS]).sum()
    return entropy


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, temperature: float,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    if not logits.requires_grad:  # π_old and reference passes: one float32 copy of the chunk
        logp, p = log_softmax_at(logits, targets, 1 / temperature, softmax=with_entropy)
        return logp, _entropy(p) if with_entropy else logp.new_zeros(())
    logits = logits / temperature  # a trained head, checkpointed: differentiable ops
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return picked, picked.new_zeros(())
    with torch.no_grad():  # for the logs only
        entropy = (lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)).sum()
    return picked, entropy


class FusedLinearLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ / T)[target] per row, over chunks of rows, and the summed entropy (no gradient). The gradient
    with respect to each row, (onehot − softmax) W / T, is computed in the forward and scaled in the backward. The
    head is frozen (RL refuses a trained head, ``rl/module.py``): no weight gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                temperature: float, chunk: int, dtype: torch.dtype, with_entropy: bool):
        w = weight.to(dtype)  # once per call
        b = bias.to(dtype) if bias is not None else None
        logp = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):  # a shape, not a value: no host sync
            t = targets[start : start + chunk]
            p = F.linear(hidden[start : start + chunk].to(dtype), w, b).float()  # the chunk's float32 logits
            logp[start : start + chunk], p = log_softmax_at(p, t, 1 / temperature, softmax=True)  # p: softmax
            if with_entropy:  # for the logs only
                entropy += _entropy(p)
            p[torch.arange(t.shape[0], device=t.device), t] -= 1  # softmax − onehot = −d log p / d logits
            p, unscale = cast_for_matmul(p, dtype)
            grad_h[start : start + chunk] = (p @ w).mul_(-unscale / temperature).to(hidden.dtype)
            del p  # not alive while the next chunk's logits are made
        ctx.save_for_backward(grad_h)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy):
        (grad_h,) = ctx.saved_tensors
        return (grad_h.float() * grad_logp[:, None]).to(grad_h.dtype), None, None, None, None, None, None, None


def chunked_logprobs(hidden: torch.Tensor, head, index: torch.Tensor, targets: torch.Tensor, temperature: float,
                     chunk: Optional[int] = None, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at the flat positions ``index`` of ``hidden`` (B, T, d), under ``softmax(head(h) / T)``, and the
    summed entropy of those distributions (detached; 0 unless ``with_entropy``). ``chunk``: positions per LM-head
    call (default ``CHUNK``: 1,024 × 151,936 float32 logits = 0.6 GB at a time)."""
    chunk = chunk or CHUNK
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    linear = head_linear(head) if torch.is_grad_enabled() and picked.requires_grad else None
    if linear is not None and not linear.weight.requires_grad and (linear.bias is None or not linear.bias.requires_grad):
        logp, entropy = FusedLinearLogProbs.apply(picked, linear.weight, linear.bias, targets, temperature, chunk,
                                                  matmul_dtype(picked), with_entropy)
        return logp, entropy.detach()
    parts, entropy = [], hidden.new_zeros((), dtype=torch.float32)  # no gradient, or a trained head (checkpointed)
    for start in range(0, index.shape[0], chunk):  # a shape, not a value: no host sync
        part, tgt = picked[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and part.requires_grad:
            logp, ent = checkpoint(_chunk_logprobs, part, tgt, head, temperature, with_entropy, use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs(part, tgt, head, temperature, with_entropy)
        parts.append(logp)
        entropy = entropy + ent
    logp = torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)
    return logp, entropy.detach()


def completion_logprobs(model, batch: dict, temperature: float, with_entropy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) log-probabilities of a scoring micro-batch's scored tokens (0 elsewhere) at ``temperature``, and their
    summed entropy. ``batch`` (``collate_scoring``): left-padded prompts + right-padded completions, the flat
    positions of the scored tokens and those tokens (built on the CPU: no host sync here). Positions are numbered
    from each row's first real token, as ``generate`` numbers them."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width, (rows, length) = batch["prompt_width"], batch["score_mask"].shape
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    base = unwrapped(model)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
    hidden = hidden[:, width - 1 : -1]  # position t predicts token t + 1: the completion's tokens
    logp, entropy = chunked_logprobs(hidden, base.get_output_embeddings(), batch["index"], batch["targets"],
                                     temperature, with_entropy=with_entropy)
    out = torch.zeros(rows * length, dtype=logp.dtype, device=logp.device).index_put((batch["index"],), logp)
    return out.view(rows, length), entropy


def collate_scoring(prompts: list[list[int]], completions: list[list[int]], scored: list[list[int]], pad_id: int,
                    sampler_logp: Optional[list[Optional[list[float]]]] = None) -> dict:
    """Tensors (on the CPU) to score completions: ids (prompts left-padded, completions right-padded), attention
    mask, the (B, T) mask of scored tokens (``scored``: 1 per completion token that enters the loss), their flat
    positions and ids, and the sampler's log-probabilities where given (NaN elsewhere)."""
    width, length = max(len(p) for p in prompts), max(1, max(len(c) for c in completions))
    rows = len(prompts)
    ids = torch.full((rows, width + length), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width + length), dtype=torch.long)
    score = torch.zeros((rows, length), dtype=torch.long)
    sampler = torch.full((rows, length), float("nan"))
    for b, (p, c, s) in enumerate(zip(prompts, completions, scored)):
        ids[b, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
        ids[b, width : width + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[b, width - len(p) : width + len(c)] = 1
        score[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        if sampler_logp is not None and sampler_logp[b] is not None:
            sampler[b, : len(sampler_logp[b])] = torch.tensor(sampler_logp[b], dtype=torch.float32)
    r, t = score.nonzero(as_tuple=True)
    return {"input_ids": ids, "attention_mask": mask, "prompt_width": width, "score_mask": score,
            "index": r * length + t, "targets": ids[:, width:][r, t], "sampler_logp": sampler}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
