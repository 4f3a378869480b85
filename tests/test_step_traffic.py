"""The byte count behind benchmarks/step_traffic.py: what it counts as moved is what an op reads and writes."""

from __future__ import annotations

import sys

import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from step_traffic import Traffic  # noqa: E402

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
