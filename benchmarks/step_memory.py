"""Peak memory of the SFT step at the real model size, counted on CPU: what ``fit`` holds on one GPU.

    python benchmarks/step_memory.py                  # every arm, R1-Distill-1.5B shapes cut to 1 and 2 layers
    python benchmarks/step_memory.py --arms ckpt-4096 --json out.json

What a step holds is a count of bytes, not a time, so a CPU counts what a GPU's allocator will hold
(``torch.cuda.max_memory_allocated``): the weights, the LoRA weights, their gradients and AdamW's two moments, and
the peak of every tensor created during the step's forward and backward (a ``TorchDispatchMode`` that follows each
aten op's output storages until they are freed: ``byte_counts.LiveBytes``), checked against the CPU allocator's own
peak (``byte_counts.AllocatorPeak``), which also sees temporaries made inside an op. The model is DeepSeek-R1-Distill-Qwen-1.5B's
architecture (hidden 1,536, MLP 8,960, 12 / 2 heads, vocabulary 151,936, untied head) with random weights and its
decoder cut to 1 and 2 layers, built by ``fit``'s loader with configs/sft.yaml's model and LoRA settings (nf4 +
double quant, bf16 autocast as ``bf16-mixed``, LoRA r16 on every linear layer, dropout 0.05), and the step is the
module's own ``training_step`` + backward + AdamW step. Attention is medadapt's ``varlen`` on packed rows flattened
as ``fit`` flattens them (on CUDA torch's flash varlen kernel, here its per-segment CPU emulation; both keep O(L)
per head, no L x L scores). Everything but the compute grows linearly in decoder layers, so 28 layers =
one layer + 27 x (two layers - one layer); the report prints both measurements, and measures the first arm at
``--check_layers`` (4) layers against that line.

Arms (rows are packed o1-sized examples: 675 tokens, the first 100 a prompt without labels):
  ckpt-4096        sft.yaml with checkpointing on, one row of 4,096 tokens: issue 26's goal of <= 8 GB
  issue-19 ckpt    the same row with the issue-19 settings (float32 frozen base, PEFT's LoRA forward): the baseline
  sft.yaml 3x2048  sft.yaml's micro-batch (3 rows of 2,048) with checkpointing off, as ``auto`` picks on 80 GB: the
                   peak against what ``gradient_checkpointing: auto`` estimated before deciding (checkpointing.py:
                   saved activations per token x tokens x MARGIN + RESERVE must cover the step, or auto is unsafe)

Not counted: the CUDA context and kernels' module images (~0.5 GB, outside the allocator), the caching allocator's
rounding and fragmentation (``memory_reserved`` - ``memory_allocated``), cuBLAS/flash workspaces held outside
tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from byte_counts import AllocatorPeak, LiveBytes, hidden_in_an_op  # noqa: E402
from rl_memory import R1, R1_LAYERS, build_model  # noqa: E402
from step_traffic import arm_module  # noqa: E402
from scratch import scratch_dir  # noqa: E402

GOAL = 8e9  # bytes: "<= 8 GB at 4,096 tokens with checkpointing on" (issue 26)
EXAMPLE, PROMPT = 675, 100  # the o1 sample's mean length under the R1 tokenizer; a question-sized prompt
ARMS = {  # name: (model overrides, lora overrides, rows, tokens per row)
    "ckpt-4096": ({"gradient_checkpointing": True}, {}, 1, 4096),
    "issue-19 ckpt": ({"gradient_checkpointing": True, "frozen_dtype": "float32"}, {"fused": False}, 1, 4096),
    "sft.yaml 3x2048": ({"gradient_checkpointing": False}, {}, 3, 2048),
}


def packed_batch(rows: int, width: int, vocab: int) -> dict:
    """``rows`` rows of ``width`` tokens, each packed with o1-sized examples (the last one cut to fit), collated
    and flattened as the data module and ``on_before_batch_transfer`` do."""
    from medadapt.data.packing import IGNORE_INDEX, collate, flatten_packed

    g = torch.Generator().manual_seed(width * rows)
    packed = []
    for _ in range(rows):
        row, left = [], width
        while left:
            n = min(EXAMPLE, left)
            ids = torch.randint(100, vocab - 100, (n,), generator=g).tolist()
            row.append({"input_ids": ids, "labels": [IGNORE_INDEX] * min(PROMPT, n - 1) + ids[min(PROMPT, n - 1):]})
            left -= n
        packed.append(row)
    return flatten_packed(collate(packed, pad_id=0, pad_to_multiple_of=1))


def weight_bytes(model) -> tuple[int, int]:
    """Bytes of every parameter, buffer and 4-bit quantization state (absmax, codebooks, the nested double-quant
    state), each storage once; and of the trainable parameters alone."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(seen.values()), trainable


def measure(module, batch: dict) -> dict:
    """One optimizer step as ``fit`` takes it under ``bf16-mixed``: training_step under autocast, backward outside
    it, AdamW's step. Peak of what the step created, and what stays between steps (gradients freed, moments kept)."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=False)
    module.model.zero_grad(set_to_none=True)
    with AllocatorPeak() as allocator, LiveBytes() as live:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
        grads = live.settle()
        optimizer.step()
        moments = live.settle() - grads  # AdamW's exp_avg and exp_avg_sq
    module._step_stats = None
    module.model.zero_grad(set_to_none=True)
    return {"peak": live.peak, "peak_op": live.peak_op, "allocator_peak": allocator.peak, "moments": moments,
            "loss": float(loss.detach())}


def saved_per_token(module, batch: dict) -> float:
    """What ``gradient_checkpointing: auto`` measures before it decides: saved activations per token of the first
    row's first 256 tokens, checkpointing off (``checkpointing.activation_bytes_per_token``, as the module calls it)."""
    from medadapt.checkpointing import activation_bytes_per_token

    with torch.autocast("cpu", dtype=torch.bfloat16):
        return activation_bytes_per_token(module.model, batch, module)


def extrapolate(one: float, two: float) -> float:
    return one + (R1_LAYERS - 1) * (two - one)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--check_layers", type=int, default=4,
                    help="also measure the first arm at this many layers, against the line through 1 and 2 (0: skip)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.check_layers and args.check_layers < 3:
        ap.error(f"--check_layers {args.check_layers}: 0 (skip) or at least 3 (a point beyond the line's two)")
    from medadapt.checkpointing import MARGIN, RESERVE

    work = scratch_dir("step_memory-")
    report: dict = {}
    for name in args.arms:
        model_over, lora_over, rows, width = ARMS[name]
        runs = {}
        for layers in (1, 2) + ((args.check_layers,) if name == args.arms[0] and args.check_layers else ()):
            # fit's module from configs/sft.yaml with the settings auto picks on a GPU fixed: varlen, eager, no Liger
            module = arm_module(build_model(layers, work), {"attn_implementation": "varlen", **model_over}, lora_over)
            batch = packed_batch(rows, width, R1["vocab_size"])
            weights, trainable = weight_bytes(module.model)
            runs[layers] = {"weights": weights, "trainable": trainable, **measure(module, batch)}
            if name.startswith("sft.yaml"):
                runs[layers]["auto_saved_per_token"] = saved_per_token(module, batch)
            del module
            r = runs[layers]
            print(f"  {name}, {layers} layer(s): weights {r['weights'] / 2**30:.2f} GiB, step peak "
                  f"{r['peak'] / 2**30:.3f} GiB (at {r['peak_op']}; the CPU allocator's {r['allocator_peak'] / 2**30:.3f}"
                  f" GiB), AdamW moments {r['moments'] / 2**20:.0f} MiB, loss {r['loss']:.3f}", flush=True)
            if hidden := hidden_in_an_op(r["peak"], r["allocator_peak"]):
                print(f"  WARNING: {name}, {layers} layer(s): {hidden}", flush=True)
        full = {k: extrapolate(runs[1][k], runs[2][k]) for k in ("weights", "peak", "moments")}
        if len(runs) == 3:  # the measured third point against the line through the first two
            n = args.check_layers
            line = runs[1]["peak"] + (n - 1) * (runs[2]["peak"] - runs[1]["peak"])
            runs["linearity"] = {"layers": n, "predicted": line, "measured": runs[n]["peak"]}
            print(f"  {name}: the line through 1 and 2 layers predicts {line / 2**30:.3f} GiB at {n} layers; measured "
                  f"{runs[n]['peak'] / 2**30:.3f} GiB ({runs[n]['peak'] / line - 1:+.1%})", flush=True)
        total = full["weights"] + full["moments"] + full["peak"]
        report[name] = {"runs": runs, "r1": full, "r1_total": total, "tokens": rows * width}
        if "auto_saved_per_token" in runs[1]:
            per_token = extrapolate(runs[1]["auto_saved_per_token"], runs[2]["auto_saved_per_token"])
            need = per_token * rows * width * MARGIN + RESERVE
            report[name]["auto"] = {"saved_per_token": per_token, "need": need, "covers": need >= full["peak"]}
    print("\nDeepSeek-R1-Distill-Qwen-1.5B (28 layers), one optimizer step, bytes a GPU's allocator holds:")
    print("| arm | tokens | weights (nf4 + bf16 embed/head) | AdamW moments | step peak above them | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in report.items():
        f = r["r1"]
        print(f"| {name} | {r['tokens']:,} | {f['weights'] / 2**30:.2f} GiB | {f['moments'] / 2**30:.2f} GiB | "
              f"{f['peak'] / 2**30:.2f} GiB | **{r['r1_total'] / 2**30:.2f} GiB** ({r['r1_total'] / 1e9:.2f} GB) |")
    if "ckpt-4096" in report:
        total = report["ckpt-4096"]["r1_total"]
        print(f"\nckpt-4096: {total / 1e9:.2f} GB, {'meets' if total <= GOAL else 'MISSES'} the goal (<= {GOAL / 1e9:.0f} GB)"
              + (f"; {total / report['issue-19 ckpt']['r1_total']:.2f}x the issue-19 settings"
                 if "issue-19 ckpt" in report else ""))
    for name, r in report.items():
        if "auto" in r:
            a = r["auto"]
            print(f"{name}: auto measured {a['saved_per_token'] / 1024:.0f} KiB saved per token; it asks for "
                  f"{a['need'] / 2**30:.1f} GiB free (x {MARGIN} + {RESERVE / 2**30:.0f} GiB) for a step peak of "
                  f"{r['r1']['peak'] / 2**30:.1f} GiB above the weights: "
                  + ("covered" if a["covers"] else "NOT covered: auto could run out of memory"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return report


if __name__ == "__main__":
    main()
