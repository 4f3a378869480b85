"""medadapt's LoRA forward for training: what PEFT's computes, with fewer passes over the activations.

PEFT's LoRA layer (0.21) computes ``y = base(x) + B(A(dropout(x))) · s``, and for a 4-bit base first clones
``base(x)``. Per adapted projection that is a fresh dropout mask and dropped copy of ``x`` (q, k and v read the same
``x``: three masks, three copies; gate and up: two), a copy of the base output, one pass to scale the LoRA output
and one to add it. Memory traffic, not FLOPs, bounds a QLoRA step (``benchmarks/step_traffic.py``), so here:

    y = addmm(base(x), A(d(x)), (s · B)ᵀ)

- **one dropout per distinct input**: the projections of one group (q/k/v; gate/up) share one mask and one dropped
  copy of their common input, drawn by whichever of them runs first; the recipe's rate is kept (each projection still
  sees its input dropped at ``p``), with one draw instead of three (two). Under activation checkpointing the recompute
  replays the same draws in the same order, so backward sees the masks forward used;
- **the scale folded into B** (a rank × out copy of a weight, not a tokens × out pass) and **the add folded into the
  matmul** (``addmm``);
- **no clone** of the 4-bit output: the add is out of place, so no view of it is ever written;
- **a one-byte mask**: the dropout keeps a boolean mask for backward (``BoolDropout``), not a mask in the activation
  dtype (half the saved bytes of ``nn.Dropout``'s: 9 KiB per token per layer less at the R1 width);
- **no dropout on frozen stacked adapters** (CPT→SFT's CPT adapter, RL's SFT adapter): they are fixed weights of the
  model being trained, and noise there would train the new adapter against a moving base.

Stacked adapters are added one after another the same way. Anything else (adapters disabled or merged, mixed-batch
``adapter_names``, DoRA and other variants, a LoRA bias) takes PEFT's own forward. Evaluation builds keep PEFT's
forward throughout. Equal to PEFT's at dropout 0 to fp32 rounding (``tests/test_lora.py``).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

#: projections that read the same input tensor in the decoders medadapt trains (Qwen2, Llama, Mistral, Qwen3)
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


class BoolDropout(torch.autograd.Function):
    """Inverted dropout that saves a boolean keep-mask (1 byte per value) for backward. Draws with ``bernoulli_`` from
    torch's generator, so activation checkpointing's restored RNG state replays the same mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(keep)
        return torch.mul(x, keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None


def drop(x: torch.Tensor, dropout: torch.nn.Dropout) -> torch.Tensor:
    return BoolDropout.apply(x, dropout.p)


class DropoutGroup:
    """The dropped input of a group of sibling projections, drawn by the first member to see the input and left on the
    input tensor itself until every member has taken it (then released).

    The dropped copy lives on the input (an attribute), not here: its life is the forward's, and a compiled,
    checkpointed layer traces it as a value of its own region (dynamo refuses to mutate state from outside
    ``torch.utils.checkpoint``'s region: kept here, it broke the graph and left checkpointed layers eager)."""

    def __init__(self, members: set[str]):
        self.members = frozenset(members)
        self.key = "_medadapt_dropped_" + "_".join(sorted(members))

    def take(self, name: str, x: torch.Tensor, dropout: torch.nn.Module) -> torch.Tensor:
        state = getattr(x, self.key, None)
        if state is not None and name in state[1]:
            dropped, waiting = state[0], state[1] - {name}
        else:  # the first member to see this input draws the mask
            dropped, waiting = drop(x, dropout), self.members - {name}
        setattr(x, self.key, (dropped, waiting) if waiting else None)
        return dropped


def fuse_lora(model) -> int:
    """Give every LoRA linear layer of ``model`` medadapt's training forward; returns how many."""
    from peft.tuners.lora import LoraLayer

    groups: dict[tuple[str, frozenset], DropoutGroup] = {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_A")
              and isinstance(m.get_base_layer(), torch.nn.Module) and hasattr(m.get_base_layer(), "in_features")]
    siblings: dict[str, set[str]] = {}
    for name, _ in layers:
        parent, _, leaf = name.rpartition(".")
        siblings.setdefault(parent, set()).add(leaf)
    for name, m in layers:
        parent, _, leaf = name.rpartition(".")
        group = None
        for shared in SHARED_INPUTS:
            members = shared & siblings[parent]
            if leaf in members and len(members) > 1:
                group = groups.setdefault((parent, frozenset(members)), DropoutGroup(members))
        m._medadapt_name, m._medadapt_group = leaf, group
        m._peft_forward = m.forward
        m.forward = types.MethodType(fused_forward, m)
    return len(layers)


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + Σ_adapters (s·B) A d(x)`` with the add inside the matmul (see the module's docstring)."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or any(a in self.lora_variant for a in active) or any(self.lora_B[a].bias is not None for a in active)):
        return self._peft_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    if not active:
        return result
    autocast = torch.is_autocast_enabled(x.device.type)
    out = result.reshape(-1, result.shape[-1])
    for adapter in active:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        h = dropped_input(self, x, adapter)
        if not autocast and h.dtype != A.dtype:  # as PEFT: the input in the adapter's dtype outside autocast
            h = h.to(A.dtype)
        h = F.linear(h.reshape(-1, h.shape[-1]), A)
        scaled = B * self.scaling[adapter]
        if autocast or out.dtype == scaled.dtype:
            out = torch.addmm(out, h, scaled.t())
        else:
            out = out + F.linear(h, scaled).to(out.dtype)
    return out.view(*result.shape[:-1], out.shape[-1])


def dropped_input(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """The adapter's dropout of ``x``: none for a frozen adapter or outside training, shared with the group's siblings
    for the trained one."""
    dropout = self.lora_dropout[adapter]
    if not self.training or not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0:
        return x
    if not self.lora_A[adapter].weight.requires_grad:
        return x  # a frozen stacked adapter: fixed weights, no noise
    group: Optional[DropoutGroup] = self._medadapt_group
    return drop(x, dropout) if group is None else group.take(self._medadapt_name, x, dropout)
