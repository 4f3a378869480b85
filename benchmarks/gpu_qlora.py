"""QLoRA SFT throughput at DeepSeek-R1-Distill-Qwen-1.5B size: medadapt's step vs an HF-Trainer-style loop.

    python benchmarks/gpu_qlora.py                # one GPU: the real 1.5B architecture, seq 2048 and 4096
    python benchmarks/gpu_qlora.py --tiny         # CPU proof of the script: a 2-layer model, short sequences
    python benchmarks/gpu_qlora.py --json out.json   # also write every figure

The model is the R1-Distill-Qwen-1.5B architecture (config from ../shared/NOTES.md) with random weights
(speed does not depend on weight values), saved once and loaded 4-bit nf4 + double quant through
medadapt's own loader, LoRA r16 on all linear layers, gradient checkpointing, bf16 compute. Needs only
torch, transformers, peft, lightning and bitsandbytes: no hub, no datasets.

Arms, on the same synthetic SFT-like lengths (uniform between seq/8 and seq), each timed after warm-up:
  * baseline (the seed's HF Trainer settings): batch 2 × accumulation 4, each batch padded to its
    longest sequence, 2D padding mask, mean loss per micro-batch, full logits;
  * previous medadapt step: the same sequences packed into rows of ``seq`` tokens (best-fit), a dense
    (B, 1, L, L) block-diagonal float mask (SDPA then falls back to its memory-efficient kernel over the
    full L²), full-vocabulary logits in float32;
  * medadapt now, once per attention implementation available here (sdpa; flex_attention with Triton on
    CUDA; flash_attention_2 with ``flash_attn``): packed rows described by restarted position_ids alone,
    the LM head + cross-entropy on supervised positions in chunks (``CausalLMModule.loss_sum``).
Packed arms take as many rows per step as hold about the same real tokens as the baseline's 8 sequences.
Reported per arm: real (non-padding) tokens/s, model FLOPs utilisation (6·N + 12·L·d·s FLOPs per token,
PaLM's definition, against the card's dense bf16 peak), peak allocated memory; then ratios to the baseline.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch

import torch.nn.functional as F

from medadapt.data.packing import IGNORE_INDEX, block_causal_mask, collate, pack
from medadapt.model import LoraConfig, ModelConfig, load_model
from medadapt.module import CausalLMModule

R1_DISTILL_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072,
                       tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def build_model_dir(arch: dict) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(tempfile.mkdtemp()) / "r1-distill-arch"
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**arch, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def matmul_params(arch: dict) -> int:
    """Weights that take part in matmuls (decoder projections + LM head; the embedding lookup is free).
    Counted from the config: 4-bit parameters report packed sizes."""
    d, i = arch["hidden_size"], arch["intermediate_size"]
    head_dim = d // arch["num_attention_heads"]
    kv = arch["num_key_value_heads"] * head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * i  # q, o; k, v; gate, up, down
    return arch["num_hidden_layers"] * per_layer + arch["vocab_size"] * d


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sequences(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(seq // 8, seq)
        ids = [rng.randrange(1000, vocab - 1000) for _ in range(length)]
        prompt = length // 4  # a question, then a supervised answer
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def baseline_step(model, micro: list[list[dict]], device) -> tuple[int, int]:
    """HF Trainer style: padded micro-batches, 2D mask, loss = mean over each micro-batch / accumulation."""
    real = padded = 0
    for group in micro:
        batch = collate([[ex] for ex in group], pad_id=0, pad_to_multiple_of=1)
        mask = (batch["segment_ids"] > 0).long().to(device)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, labels=batch["labels"].to(device),
                    use_cache=False)
        (out.loss / len(micro)).backward()
        real += int(mask.sum())
        padded += mask.numel()
    return real, padded


def previous_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """medadapt's step before issue 14: explicit 4D block mask, full-vocabulary float32 logits."""
    mask = block_causal_mask(batch["segment_ids"], model.get_input_embeddings().weight.dtype)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                   use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def packed_step(loss_fn, rows: list[list[dict]], device, rows_per_micro: int) -> tuple[int, int]:
    real = padded = 0
    for start in range(0, len(rows), rows_per_micro):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + rows_per_micro], pad_id=0).items()}
        loss, n = loss_fn(batch)
        (loss / n.clamp(min=1)).backward()
        real += int((batch["segment_ids"] > 0).sum())
        padded += batch["input_ids"].numel()
    return real, padded


def attention_implementations(device) -> list[str]:
    """The implementations that run here: sdpa always; flex_attention with Triton on CUDA; flash_attention_2
    where flash_attn is installed."""
    import importlib.util

    found = ["sdpa"]
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        found.append("flex_attention")
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    return found


def measure(arm: str, step, steps: int, warmup: int, flops_per_token: float, device) -> dict:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    real = padded = 0
    start = time.perf_counter()
    for _ in range(steps):
        r, p = step()
        real, padded = real + r, padded + p
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tps = real / seconds
    peak = peak_tflops()
    result = {"tokens_per_s": tps, "padding": 1 - real / padded,
              "mfu": tps * flops_per_token / (peak * 1e12) if peak else None,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    mem = f"{result['peak_gib']:.1f} GiB" if result["peak_gib"] is not None else "n/a"
    print(f"  {arm:40s} {tps:10.0f} tok/s   MFU {mfu:>6s}   peak mem {mem:>9s}   padding {100 * result['padding']:.1f}%")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer model and short sequences (CPU proof)")
    ap.add_argument("--seq", type=int, nargs="*", help="sequence lengths (default 2048 4096; tiny: 128 256)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per arm (default 3; tiny 1)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--model-dir", help="an already built model folder of this architecture (default: build one)")
    args = ap.parse_args(argv)
    arch = TINY if args.tiny else R1_DISTILL_1_5B
    seqs = args.seq or ([128, 256] if args.tiny else [2048, 4096])
    steps = args.steps or (1 if args.tiny else 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"

    path = args.model_dir or build_model_dir(arch)
    model = load_model(ModelConfig(name_or_path=path, load_in_4bit=True, compute_dtype=dtype, attn_implementation="sdpa",
                                   gradient_checkpointing=True),
                       LoraConfig(r=16, alpha=32, dropout=0.05), training=True)
    holder = CausalLMModule.__new__(CausalLMModule)
    torch.nn.Module.__init__(holder)
    holder.model = model
    base = model.get_base_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_params = matmul_params(arch)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (not a GPU run)"
    print(f"device: {card}; {n_params / 1e9:.2f}B matmul params (4-bit nf4 + LoRA r16), compute {dtype}")
    report = {"device": card, "matmul_params": n_params, "dtype": dtype, "seqs": {}}
    for seq in seqs:
        flops = 6 * n_params + 12 * arch["num_hidden_layers"] * arch["hidden_size"] * seq
        data = sequences(8 * (steps + 1), seq, arch["vocab_size"], seed=seq)
        groups = [data[i : i + 8] for i in range(0, len(data), 8)]

        def stepper(run_one):
            def step():
                r = run_one()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return r
            return step

        baseline_batches = iter(groups * 1000)
        rows_all = [[data[i] for i in row] for row in pack([len(d["input_ids"]) for d in data], seq)]
        per_step = max(1, math.ceil(len(rows_all) / (steps + 1)))
        packed_batches = [rows_all[i : i + per_step] for i in range(0, len(rows_all), per_step)]

        def packed(loss_fn):
            batches = iter(packed_batches * 1000)
            return stepper(lambda: packed_step(loss_fn, next(batches), device, rows_per_micro=2))

        print(f"seq {seq}:")
        arms = {}
        base.set_attn_implementation("sdpa")
        arms["baseline"] = measure("baseline (HF Trainer-style, padded)", stepper(
            lambda: baseline_step(model, [g[i : i + 2] for g in [next(baseline_batches)] for i in range(0, 8, 2)],
                                  device)), steps, 1, flops, device)
        arms["previous"] = measure("previous (packed, 4D mask, full logits)",
                                   packed(lambda b: previous_loss(model, b)), steps, 1, flops, device)
        for impl in attention_implementations(device):
            base.set_attn_implementation(impl)
            arms[f"medadapt-{impl}"] = measure(f"medadapt ({impl}, chunked CE)", packed(holder.loss_sum), steps, 1,
                                               flops, device)
        base.set_attn_implementation("sdpa")
        for name, result in arms.items():
            result["ratio_to_baseline"] = result["tokens_per_s"] / arms["baseline"]["tokens_per_s"]
        best = max((n for n in arms if n.startswith("medadapt")), key=lambda n: arms[n]["tokens_per_s"])
        print(f"  ratio {best}/baseline: {arms[best]['ratio_to_baseline']:.2f}x   "
              f"previous/baseline: {arms['previous']['ratio_to_baseline']:.2f}x")
        report["seqs"][seq] = arms
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
