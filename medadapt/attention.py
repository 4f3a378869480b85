"""Which attention kernel a run uses, and medadapt's varlen attention on torch's own flash kernels.

Packed rows need attention that stays inside each example. transformers builds that from restarted
position_ids for sdpa, but as a dense (batch, 1, L, L) mask, which sends SDPA to its memory-efficient kernel
instead of flash; flex_attention recompiles its block mask for every new packed length (measured 5-8x
slower than sdpa on an H200, README "GPU"). torch >= 2.10 ships flash-attention's variable-length kernels
with autograd (``torch.nn.attention.varlen``): every example of the batch is one segment of a flat
(tokens, heads, dim) tensor, delimited by cumulative lengths, and no mask exists at all. The packed batch
already knows those boundaries (``collate`` writes ``cu_seq_lens``), so ``varlen`` is a transformers
``AttentionInterface`` function fed through the model's attention kwargs, with no host sync per layer.

On a CPU (tests) the same function computes each segment with SDPA alone: the flattening, the boundaries
passed through the model, GQA and scaling are the code under test; the CUDA kernel is torch's, and
benchmarks/gpu_check.py checks a packed example against itself alone for every attention path on the GPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: the name transformers knows medadapt's varlen function by (``AttentionInterface``)
VARLEN = "medadapt_varlen"
#: what ``model.attn_implementation`` accepts
ATTENTION = ("auto", "sdpa", "varlen", "eager", "flex_attention", "flash_attention_2")


def torch_varlen():
    """torch's ``varlen_attn`` (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cuda_varlen_available() -> bool:
    """torch's flash varlen kernels run here: a CUDA device of compute capability >= 8.0 (Ampere or newer)."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
            and torch_varlen() is not None)


def cpu_flex_problem() -> Optional[str]:
    """Why flex_attention must not run on this machine's CPU, or None. torch's compiled CPU flex kernel (inductor's
    template) returns wrong values, nondeterministically and sometimes NaN, when generated for AVX2: reproduced with
    torch 2.13 on a 72-token packed batch (2 of 3 fresh compiles off by up to 1.5, at 1 and at 2 threads), while the
    AVX-512 build of the same kernel matched SDPA in every run at the widths medadapt runs (rows padded to multiples
    of ``FLEX_BUCKET``; unpadded 11–56-token rows came out wrong at one thread). Where inductor would generate
    anything but AVX-512, flex_attention on CPU is refused."""
    if torch.cuda.is_available():
        return None
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = str(pick_vec_isa()) or "no vector ISA"
    except Exception as e:  # noqa: BLE001 (a private API: if it moves, refuse rather than guess)
        isa = f"unknown ({type(e).__name__})"
    if isa.startswith("avx512"):
        return None
    return (f"attn_implementation: flex_attention on this CPU ({isa}): torch {torch.__version__}'s compiled CPU flex "
            "kernel returns wrong values outside AVX-512; use sdpa on CPU (flex_attention is a GPU lever)")


def resolve_attention(name: str, *, training: bool) -> str:
    """The transformers ``attn_implementation`` a build uses.

    ``auto`` never takes a path slower than sdpa. Training on CUDA: ``flash_attention_2`` when flash_attn
    is installed, else torch's varlen flash kernels (packed boundaries, no mask), else sdpa. Inference
    batches are padded, not packed, so they run sdpa (or flash_attention_2 when installed), and ``varlen``
    asked for an inference build falls back to sdpa. flex_attention runs only when named.
    """
    if name == "varlen" and not training:
        log.info("attention: varlen needs packed boundaries; this inference build uses sdpa")
        return "sdpa"
    if name == "varlen":
        register_varlen()
        return VARLEN
    if name == "flex_attention" and cpu_flex_problem():
        raise ValueError(cpu_flex_problem())
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if training and cuda_varlen_available():
        register_varlen()
        return VARLEN
    return "sdpa"


def register_varlen() -> None:
    """Make ``medadapt_varlen`` a name transformers accepts (no mask function: it needs none)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             cu_seq_lens_q: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed segment. ``query`` (B, H, L, D), ``key``/``value`` (B, H_kv, L, D);
    ``cu_seq_lens_q`` (N + 1,) int32 boundaries over the flattened B·L positions (padding runs are segments of
    their own), ``max_length_q`` the longest segment. Returns (B, L, H, D) as transformers' kernels do."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError("varlen attention needs the packed batch's boundaries (cu_seq_lens_q, max_length_q); "
                         "inference and generation use sdpa (model.attn_implementation: auto)")
    if sliding_window is not None:
        raise ValueError("varlen attention does not implement sliding windows; use sdpa for this model")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if kernel_runs(q):
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling, heads // kv_heads)
    else:
        out = _segments_sdpa(q, k, v, cu_seq_lens_q, scaling, heads // kv_heads)
    return out.view(batch, length, heads, dim), None


def kernel_runs(q: torch.Tensor) -> bool:
    """Whether torch's varlen kernel runs on ``q``'s device (CUDA; a CPU test registers a kernel of its own)."""
    return q.is_cuda


def _cuda_varlen(q, k, v, cu, max_len: int, scale, groups: int) -> torch.Tensor:
    """torch's flash varlen kernel in the autocast dtype (flash runs in fp16/bf16 only; k-bit preparation
    leaves the residual stream in float32), across the signature change of torch 2.10 → 2.11. Without autocast the
    output goes back to the input's dtype (a float32 run's o_proj takes float32 only); under autocast it stays in
    the kernel's, which o_proj reads as it is (no cast pass)."""
    kernel = torch_varlen()
    params = inspect.signature(kernel).parameters
    autocast = torch.is_autocast_enabled(q.device.type)
    dtype = given = q.dtype
    if dtype == torch.float32:
        dtype = torch.get_autocast_dtype(q.device.type) if autocast else torch.bfloat16
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kw = {"scale": scale} if "scale" in params else {}
    kw.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    if groups > 1:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:  # older signatures take equal head counts
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = cu.to(device=q.device, dtype=torch.int32)
    out = kernel(q, k, v, cu, cu, max_len, max_len, **kw)
    return out if autocast else out.to(given)


def _segments_sdpa(q, k, v, cu, scale, groups: int) -> torch.Tensor:
    """The same computation on any device: causal SDPA on each segment alone (tests; CPU)."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (H, n, D)
            parts.append(F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(parts)


#: flex_attention compiles its kernels and block mask per sequence length; torch._dynamo stops recompiling after 8
#: shapes and runs flex uncompiled (it then materializes every score). Widths are padded up to a multiple of this.
FLEX_BUCKET = 512


def flex_bucket(input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids``/``position_ids`` right-padded to the next multiple of ``FLEX_BUCKET`` (a handful of shapes, one
    compile each). Padding gets position 0: a segment of its own that nothing real attends to."""
    width = input_ids.shape[1]
    extra = -width % FLEX_BUCKET
    if not extra:
        return input_ids, position_ids
    pad = (0, extra)
    return F.pad(input_ids, pad, value=0), F.pad(position_ids, pad, value=0)


def segment_boundaries(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative boundaries of the segments of a (B, L) batch flattened to B·L positions, and the longest one.

    A new segment starts at every row start and wherever the segment id changes (padding, id 0, is one segment
    per row end). Called by the collate function, on the CPU."""
    batch, length = segment_ids.shape
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = change.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([starts, torch.tensor([batch * length])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
