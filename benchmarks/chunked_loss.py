"""Peak memory of the loss: full-vocabulary logits (the previous step) vs chunked cross-entropy (``medadapt/loss.py``).

    python benchmarks/chunked_loss.py                      # V = 151,936, batch 2 × 2,048, hidden 1,536, bf16
    python benchmarks/chunked_loss.py --seq 4096

Each arm runs in a fresh process, on the same inputs: decoder hidden states that require grad, the R1-Distill-1.5B
LM head (bf16, frozen as in QLoRA), labels with a supervised answer after an unsupervised prompt in each of several
packed examples. Forward and backward of the summed loss. The number reported is the peak the loss added above the
inputs in the CPU allocator (``byte_counts.AllocatorPeak``: every allocation, temporaries inside an op too; the
process's peak RSS, used before, hid a chunk in memory freed earlier), the time of one forward+backward, and the
ratio of the two arms; also that both give the same loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def inputs(batch: int, seq: int, hidden: int, vocab: int):
    from medadapt.data.packing import IGNORE_INDEX
    from medadapt.loss import supervised_targets

    torch.manual_seed(0)
    h = (torch.randn(batch, seq, hidden) * 0.5).to(torch.bfloat16).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16).requires_grad_(False)
    labels = torch.randint(0, vocab, (batch, seq))
    for start in range(0, seq, 512):  # packed examples: a 128-token prompt, then a supervised answer
        labels[:, start : start + 128] = IGNORE_INDEX
    index, targets = supervised_targets(labels, IGNORE_INDEX)
    return h, head, labels, index, targets


def arm(name: str, batch: int, seq: int, hidden: int, vocab: int) -> dict:
    from medadapt.data.packing import IGNORE_INDEX
    from medadapt.loss import chunked_cross_entropy

    from byte_counts import AllocatorPeak

    h, head, labels, index, targets = inputs(batch, seq, hidden, vocab)
    start = time.perf_counter()
    with AllocatorPeak() as allocator:
        if name == "full":
            logits = head(h)[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        else:
            loss = chunked_cross_entropy(h, head, index, targets)
        loss.backward()
    seconds = time.perf_counter() - start
    return {"loss": loss.item(), "added_gib": allocator.peak / 2**30, "seconds": seconds,
            "supervised": int(targets.shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--arm", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = [str(args.batch), str(args.seq), str(args.hidden), str(args.vocab)]
    if args.arm:
        print(json.dumps(arm(args.arm, args.batch, args.seq, args.hidden, args.vocab)))
        return
    results = {}
    for name in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--arm", name, "--batch", shape[0], "--seq", shape[1],
                              "--hidden", shape[2], "--vocab", shape[3]], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    print(f"loss of batch {args.batch} × {args.seq} ({full['supervised']} supervised positions), vocab {args.vocab}, "
          f"hidden {args.hidden}, bf16 head, CPU, {torch.get_num_threads()} threads")
    for name, r in results.items():
        print(f"  {name:8s} peak +{r['added_gib']:6.2f} GiB   {r['seconds']:6.1f} s forward+backward   loss {r['loss']:.4f}")
    print(f"  memory ratio full/chunked: {full['added_gib'] / max(chunked['added_gib'], 1e-9):.1f}x   "
          f"time ratio chunked/full: {chunked['seconds'] / full['seconds']:.2f}   "
          f"same loss: {abs(full['loss'] - chunked['loss']) <= 1e-3 * abs(full['loss'])}")


if __name__ == "__main__":
    main()
