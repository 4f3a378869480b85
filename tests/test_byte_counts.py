"""The byte counts behind the memory and traffic benchmarks (benchmarks/byte_counts.py): what they count as held is
what is allocated and alive, what they count as moved is what an op reads and writes."""

from __future__ import annotations

import sys

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from byte_counts import AllocatorPeak, LiveBytes, Traffic, hidden_in_an_op  # noqa: E402

ROWS, VOCAB = 64, 1000
FULL = ROWS * VOCAB * 4  # one float32 (ROWS, VOCAB) tensor


def counted(work) -> int:
    x = torch.randn(ROWS, VOCAB)
    t = torch.randint(0, VOCAB, (ROWS,))
    with Traffic() as traffic:
        work(x, t)
    return traffic.bytes


def test_elementwise_ops_count_what_they_read_and_write():
    assert counted(lambda x, t: x * 2) == 2 * FULL  # read x, write the product (2 is a Python scalar)
    assert counted(lambda x, t: x.mul_(2)) == 2 * FULL  # in place: read and write x
    assert counted(lambda x, t: torch.add(x, x, out=x)) == 3 * FULL  # read twice, write once: out= is not a read
    assert counted(lambda x, t: x.sum(-1)) == FULL + ROWS * 4
    assert counted(lambda x, t: x @ x.t()) == 0  # matmuls are not elementwise traffic


def test_ops_that_move_nothing_or_only_write_count_no_reads():
    """A reshape autograd does not call a view, an allocation, a fill, a random fill in place (dropout's mask), a
    copy into existing memory: none reads what it writes over."""
    y = torch.randn(ROWS, VOCAB)  # made outside the count
    assert counted(lambda x, t: torch.ops.aten._unsafe_view(x, (VOCAB, ROWS))) == 0
    assert counted(lambda x, t: torch.empty_like(x)) == 0
    assert counted(lambda x, t: torch.zeros_like(x)) == FULL
    assert counted(lambda x, t: x.bernoulli_(0.5)) == FULL
    assert counted(lambda x, t: x.copy_(y)) == 2 * FULL  # read y, write x


def test_a_4bit_matmul_is_a_matmul():
    """bitsandbytes' 4-bit forward (gemm_4bit: weight x activation in one op, CPU and CUDA alike) is matmul work, as
    mm is; only its backward's dequantization (once per call) is traffic."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(torch.nn.Linear(64, 128, bias=False).state_dict())
    layer = layer.to("cpu")
    x = torch.randn(32, 64, requires_grad=True)
    with Traffic() as forward:
        y = layer(x)
    assert forward.bytes == 0, dict(forward.by_op)
    grad = torch.ones_like(y)
    with Traffic() as backward:
        y.backward(grad)
    assert backward.by_op["dequantize_4bit"] >= 128 * 64 * 4, dict(backward.by_op)  # the float32 weight, written


def test_indexed_ops_count_the_elements_they_touch_not_whole_tensors():
    """Picking each row's target logit, or subtracting one-hot there, touches one element per row."""
    rows, ones, first = torch.arange(ROWS), torch.ones(ROWS), torch.arange(8)  # made outside the count
    index = ROWS * 8
    assert counted(lambda x, t: x.gather(-1, t[:, None])) == index + 2 * ROWS * 4
    assert counted(lambda x, t: x.index_put_((rows, t), ones, accumulate=True)) == 2 * index + 3 * ROWS * 4
    assert counted(lambda x, t: x.index_select(0, first)) == 8 * 8 + 2 * 8 * VOCAB * 4


def test_logsumexp_counts_the_passes_its_kernel_makes_inside():
    """torch.logsumexp reads its input for the max, writes exp(x - max) to a copy and reads it for the sum, all inside
    one op the dispatch mode sees once (the allocator sees the copy: test_step_memory.py)."""
    assert counted(lambda x, t: torch.logsumexp(x, -1)) == 6 * FULL + ROWS * 4


def test_live_bytes_counts_what_is_created_and_alive_and_nothing_made_before():
    weight = torch.nn.Parameter(torch.randn(64, 32))  # made before the mode: a weight
    with LiveBytes() as live:
        view = weight.t()  # a view of the weight: nothing new
        with torch.no_grad():
            weight.mul_(0.5)  # an in-place update of it (an optimizer step): nothing new
        kept = torch.empty(1000)  # 4,000 bytes that stay
        temp = torch.empty(5000)  # 20,000 bytes, then freed
        also = kept[:10] + 0  # 40 bytes; a view of `kept` below adds nothing
        part = kept[100:200]
        del temp
        assert live.settle() == 4000 + 40
    assert live.peak == 4000 + 20000 + 40
    assert view.shape == (32, 64) and also.numel() == 10 and part.numel() == 100


def test_the_allocator_count_sees_the_temporaries_inside_an_op_that_live_bytes_cannot():
    """torch.logsumexp computes exp(x - max) into a full copy of its input inside the op: LiveBytes (op outputs) misses
    it, the allocator's count does not; both agree where every byte is an op's output."""
    x = torch.randn(256, 1024)
    with LiveBytes() as live:
        torch.logsumexp(x, dim=-1)
    with AllocatorPeak() as alloc:
        torch.logsumexp(x, dim=-1)
    assert live.peak < 2**12 and x.numel() * 4 <= alloc.peak <= x.numel() * 4 + 2**14
    assert hidden_in_an_op(max(live.peak, 1), alloc.peak) and hidden_in_an_op(alloc.peak, alloc.peak) is None
    for count in (LiveBytes, AllocatorPeak):
        with count() as c:
            y = x * 2
            z = y + 1
            del y
            z.mul_(3)
        assert 2 * x.numel() * 4 <= c.peak <= 2 * x.numel() * 4 + 64  # (+ the allocator's scalars for 2, 1, 3)


def test_the_seed_s_padding_is_priced_over_every_pair_of_examples():
    """step_traffic's seed row: the closed form equals padding every pair of examples to the longer, one by one."""
    import itertools
    import random

    from step_traffic import pair_padding

    rng = random.Random(3)
    lengths = [rng.randint(50, 2048) for _ in range(37)]
    pairs = list(itertools.combinations(lengths, 2))
    brute = sum(2 * max(a, b) for a, b in pairs) / sum(a + b for a, b in pairs)
    assert pair_padding(lengths) == pytest.approx(brute, rel=1e-12)
    assert pair_padding([100, 100, 100]) == 1.0 and pair_padding([1, 3]) == 1.5

