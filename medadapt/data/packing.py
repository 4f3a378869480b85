"""Examples → packed rows → batches described by restarted positions.

The one packing routine of the project: SFT (prompt tokens masked) and continual pretraining (every
token supervised) both hand it tokenized examples. A packed row is described by ``position_ids`` that
restart at each example: transformers (5.24, no cache, no mask passed) builds the block-diagonal causal
mask from them for sdpa, eager and flex attention, and flash-attention-2 derives its varlen sequence
lengths from them, so a packed example gets exactly the logits and loss it gets alone
(tests/data/test_packing.py, Qwen2 and Llama). An early probe had seen restarted positions fail to
isolate examples; that was a path with a 2D mask passed, which turns the detection off.

Each batch also carries ``segment_ids`` (0 = padding, 1..k = the k-th example of a row: padding and
example counts for the logs; ``block_causal_mask`` builds the explicit mask from them for code that needs
one), the segment boundaries of the flattened batch for varlen attention (``cu_seq_lens``, ``max_length``:
``attention.segment_boundaries``) and the flat indices of the supervised positions with their targets
(``loss.supervised_targets``), all computed here on the CPU so the step needs no host sync for them.
"""

from __future__ import annotations

import bisect
from typing import Sequence, TypedDict

import torch

from medadapt.attention import segment_boundaries
from medadapt.loss import supervised_targets

IGNORE_INDEX = -100


class Example(TypedDict):
    input_ids: list[int]
    labels: list[int]


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (best-fit decreasing).

    Best-fit decreasing leaves little padding (typically <2% on SFT data) and runs in
    O(n log n); the row order it produces is shuffled later by the sampler.
    """
    if any(n > max_length for n in lengths):
        raise ValueError("pack() needs examples already truncated to max_length")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), kept sorted
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
        else:
            remaining, row = free.pop(pos)
            rows[row].append(i)
            bisect.insort(free, (remaining - n, row))
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples and pad the batch to its longest row.

    The first token of every example gets no label: predicting it would mean predicting one example
    from the end of another, which the unpacked example never does.
    """
    lengths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row, start=1):
            n = len(ex["input_ids"])
            end = start + n
            input_ids[b, start:end] = torch.tensor(ex["input_ids"])
            labels[b, start:end] = torch.tensor(ex["labels"])
            labels[b, start] = IGNORE_INDEX
            position_ids[b, start:end] = torch.arange(n)
            segment_ids[b, start:end] = k
            start = end
    target_index, targets = supervised_targets(labels, IGNORE_INDEX)
    cu_seq_lens, max_length = segment_boundaries(segment_ids)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
            "target_index": target_index, "targets": targets, "cu_seq_lens": cu_seq_lens, "max_length": max_length}


def flatten_packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch as one row of its real tokens only, for attention that takes segment boundaries (varlen,
    flash_attention_2): no padding position goes through any projection. Examples are numbered 1..K across the row
    (so the logs still count examples), positions still restart per example, ``cu_seq_lens`` covers real segments
    only, and the supervised positions are re-indexed into the flat row. CPU work, done before the batch moves."""
    segments = batch["segment_ids"]
    rows, width = segments.shape
    keep = (segments > 0).reshape(-1).nonzero().squeeze(1)
    renumbered = segments + (segments.amax(dim=1, keepdim=True).cumsum(0) - segments.amax(dim=1, keepdim=True))
    renumbered = renumbered.masked_fill(segments == 0, 0).reshape(-1)[keep][None]
    new_index = torch.full((rows * width,), -1, dtype=torch.long)
    new_index[keep] = torch.arange(keep.numel())
    flat = {k: batch[k].reshape(-1)[keep][None] for k in ("input_ids", "labels", "position_ids")}
    cu_seq_lens, max_length = segment_boundaries(renumbered)
    return {**batch, **flat, "segment_ids": renumbered, "target_index": new_index[batch["target_index"]],
            "cu_seq_lens": cu_seq_lens, "max_length": max_length}


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask: a token sees earlier tokens of its own example only. The training step
    does not need it (positions suffice); it is the explicit reference the packing tests compare against,
    and the "block mask" arm of benchmarks/gpu_qlora.py.

    The additive float form (0 / dtype-min) is used because it is right under both SDPA and eager
    attention; a boolean 4D mask was wrong under eager. Padding (segment 0) attends to padding, so no
    row is fully masked (which would give NaNs).
    """
    L = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
