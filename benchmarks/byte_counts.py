"""Counts of bytes that do not depend on the device, so a CPU measures what a GPU holds and moves.

- ``LiveBytes``: the peak of tensor storages created and alive (a ``TorchDispatchMode`` following every aten op's
  outputs until they are freed): what a step holds, op by op.
- ``AllocatorPeak``: the CPU allocator's own peak (torch.profiler's allocation events), which also sees a temporary
  made inside an op, the check that ``LiveBytes`` misses nothing.
- ``Traffic``: the bytes every non-matmul op reads and writes: what a memory-bound step moves.

Used by step_memory.py, rl_memory.py, chunked_loss.py and step_traffic.py; tested in tests/test_byte_counts.py.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive (each counted once, views of them
    too; views of and in-place updates to tensors made before the mode, such as weights, not at all)."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self.ref, self.live, self.current, self.peak, self.peak_op = StorageWeakRef, {}, 0, 0, ""  # op that made the peak

    def settle(self) -> int:
        """Forget the storages freed since the last op; the bytes still alive."""
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(k)[1]
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.settle()
        # an output on an input's storage (a view, an in-place op) is not new: a weight's transpose, AdamW's
        # in-place update of a parameter, made before the mode began, must not count as created here
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in inputs:
                    self.live[storage._cdata] = (self.ref(storage), storage.nbytes())
                    self.current += storage.nbytes()
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, func.__name__
        return out


class AllocatorPeak:
    """Peak of the bytes the CPU allocator holds inside the block, above what it held at the start (torch.profiler's
    allocation events). It sees every allocation, including a temporary a kernel makes inside one op
    (``torch.logsumexp`` computes ``exp(x - max)`` into a full copy of its input), which ``LiveBytes``, following op
    outputs, cannot see. CPU kernels' own scratch buffers count too, so an op can hold more here than on a GPU:
    ``LiveBytes`` is the device-independent count, this one checks that nothing hides inside an op."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.peak = self.end = 0
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        from torch._C._profiler import _EventType

        self._profile.__exit__(*exc)
        events, stack = [], list(self._profile.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation:
                events.append((e.start_time_ns, e.extra_fields.alloc_size))  # negative: a free
            stack.extend(e.children)
        for _, size in sorted(events):  # at equal times frees sort first: never a peak that did not exist
            self.end += size
            self.peak = max(self.peak, self.end)
        return False


def hidden_in_an_op(live_peak: int, allocator_peak: int) -> str | None:
    """Why the allocator's peak exceeds the op-output count by more than 2% (a temporary made inside an op, which a
    GPU kernel may or may not make too), or None: what the memory benchmarks warn about."""
    if allocator_peak <= 1.02 * live_peak:
        return None
    return f"the allocator held {allocator_peak / live_peak - 1:.0%} more than the ops' outputs (a temporary inside an op)"


#: ops that are matmuls (tensor-core work, not elementwise traffic): their bytes are not counted
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_flash_attention_backward", "_flash_attention_forward", "_flash_attention_backward",
           "_efficient_attention_forward", "_efficient_attention_backward", "_scaled_dot_product_cudnn_attention",
           "_scaled_dot_product_cudnn_attention_backward",
           "gemm_4bit", "gemv_4bit"}  # bitsandbytes' 4-bit weight x activation (its forward on every device)
#: ops that move no bytes: views autograd does not mark as views, and allocations (memory handed out, not written)
NO_TRAFFIC = {"detach", "alias", "lift_fresh", "_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty",
              "new_empty_strided"}
#: ops that write their first argument (in place) or a new tensor shaped like it without reading it: only the
#: written bytes and any other tensor inputs count (copy_'s source, a probability tensor)
OVERWRITE = {"copy_", "fill_", "zero_", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
             "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones", "new_full"}
#: ops that read only the elements an index picks (not their whole input): counted as the picked elements read and
#: written, plus the indices
PICK = {"gather", "index", "index_select", "embedding", "take"}
#: in-place ops that update only the elements an index names: the source read, those elements read and written, the
#: indices (not the whole destination twice)
PLACE = {"index_put_", "_index_put_impl_", "scatter_", "scatter_add_", "index_add_", "index_copy_"}
#: composite ops whose kernel makes passes the mode cannot see, as full passes over their input: logsumexp reads it
#: for the max, reads it and writes a copy for x - max, exponentiates that copy in place and reads it for the sum
PASSES = {"logsumexp": 6}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traffic(TorchDispatchMode):
    """Bytes read + written by non-matmul, non-view aten ops; the number of such ops; bytes by op name."""

    def __init__(self):
        super().__init__()
        self.bytes, self.ops, self.by_op = 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in MATMULS and not func.is_view and name not in NO_TRAFFIC:
            moved = moved_bytes(name, args, kwargs, out)
            self.bytes, self.ops = self.bytes + moved, self.ops + 1
            self.by_op[name] += moved
        return out


def moved_bytes(name: str, args, kwargs, out) -> int:
    """Bytes an op reads and writes: its tensor inputs and outputs, except for ops that touch only indexed
    elements (``PICK``, ``PLACE``), which would otherwise count a whole tensor for a few rows, ops that overwrite
    without reading (``OVERWRITE``), and composite ops whose hidden passes the mode cannot see (``PASSES``)."""
    inputs = {k: v for k, v in (kwargs or {}).items() if k != "out"}  # an out= tensor is written, not read
    tensors = [t for t in tree_flatten((args, inputs))[0] if isinstance(t, torch.Tensor)]
    written = sum(nbytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
    if name in OVERWRITE:
        return written + sum(nbytes(t) for t in tree_flatten((args[1:], inputs))[0] if isinstance(t, torch.Tensor))
    index = sum(nbytes(t) for t in tensors if not t.is_floating_point())
    if name in PICK:
        return index + 2 * written
    if name in PLACE:
        return index + 3 * sum(nbytes(t) for t in tensors[1:] if t.is_floating_point())
    return PASSES.get(name, 1) * sum(nbytes(t) for t in tensors) + written
