"""``gradient_checkpointing: auto``: recompute activations only when keeping them would not fit.

Checkpointing costs a second forward of every layer in backward: ~1.4x the step time of the 1.5B model on an
H200 (README "GPU"), memory it does not need there. Whether the activations fit depends on the model, the
dtype path, the attention kernel and the tokens of a micro-batch, so they are measured, not guessed: before
the first training step a short probe (the first ``PROBE_TOKENS`` tokens of the batch) runs the real loss with
checkpointing off, and every tensor autograd saves for backward is counted (``saved_tensors_hooks``;
parameters excluded, storages counted once). Activations grow linearly with tokens for every kernel medadapt
runs on a GPU (flash/varlen/sdpa keep no L x L scores), so bytes per token x the configured tokens per
micro-batch is the estimate. Checkpointing goes off when that, with ``MARGIN`` for backward's temporaries plus
``RESERVE``, fits the device's free memory. Every rank takes the same decision (on if any rank needs it).
"""

from __future__ import annotations

import logging
import os

import torch

from medadapt.attention import segment_boundaries
from medadapt.loss import chunked_cross_entropy
from medadapt.model import unwrapped

log = logging.getLogger(__name__)

PROBE_TOKENS = 256
#: activations x MARGIN + RESERVE must fit: gradients of activations and kernel workspaces live in backward
MARGIN = 1.5
RESERVE = 2 * 2**30


def set_checkpointing(model, on: bool) -> None:
    """Switch activation checkpointing of a model built with it enabled (its layers keep their checkpoint
    function; only the flag changes, on every layer the same)."""
    for module in unwrapped(model).modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = on


def activation_bytes_per_token(model, batch: dict, forward) -> float:
    """Bytes autograd keeps for backward per token of ``batch``'s first row, with checkpointing off.
    ``forward(model_batch)`` returns the decoder's hidden states (the module's own forward)."""
    n = min(PROBE_TOKENS, batch["input_ids"].shape[1])
    probe = {"input_ids": batch["input_ids"][:1, :n], "position_ids": batch["position_ids"][:1, :n]}
    if "segment_ids" in batch:
        probe["cu_seq_lens"], probe["max_length"] = segment_boundaries(batch["segment_ids"][:1, :n].cpu())
        probe["cu_seq_lens"] = probe["cu_seq_lens"].to(batch["input_ids"].device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    set_checkpointing(model, False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = forward(probe)
        head = unwrapped(model).get_output_embeddings()
        index = torch.arange(n - 1, device=hidden.device)
        loss = chunked_cross_entropy(hidden, head, index, probe["input_ids"][0, 1:n])
    del hidden, loss
    return sum(saved.values()) / n


def free_bytes(device: torch.device) -> int:
    """Memory a step can still take: free on the GPU plus what torch's caching allocator holds unused; on a CPU
    the host's available physical memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def decide(model, batch: dict, forward, tokens_per_micro_batch: int, device: torch.device) -> tuple[bool, dict]:
    """Whether to checkpoint, and the figures behind it (logged by the caller)."""
    per_token = activation_bytes_per_token(model, batch, forward)
    need = per_token * tokens_per_micro_batch
    free = free_bytes(device)
    on = need * MARGIN + RESERVE > free
    return on, {"bytes_per_token": per_token, "tokens": tokens_per_micro_batch, "activations_gib": need / 2**30,
                "free_gib": free / 2**30}
