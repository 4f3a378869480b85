"""Peak memory of scoring a GRPO step, per completion token, at the real vocabulary: the issue-22 path (full-vocabulary
log-softmax of every completion token of the step at once) against medadapt's (micro-batches of completions, the LM
head in chunks with each log-probability's gradient computed in the forward: ``rl/scoring.py``), in one run, on CPU.

    python benchmarks/rl_memory.py                    # R1-Distill-1.5B shapes, 1 and 2 decoder layers, 4-bit + bf16
    python benchmarks/rl_memory.py --layers 1 --json out.json

The model is DeepSeek-R1-Distill-Qwen-1.5B's architecture (hidden 1,536, MLP 8,960, 12 heads / 2 KV heads, vocab
151,936) with its decoder cut to 1 or 2 layers and random weights, loaded by medadapt's own loader as ``fit`` runs it:
nf4 base, bf16 compute under autocast, a LoRA r16 on every linear layer, activation checkpointing. Both arms score
the same rollout (prompt 64 tokens; completions of T tokens) and back-propagate the policy term; the reference and
π_old passes are no-grad and add less. What is measured is the peak of live tensor bytes created during forward +
backward (a ``TorchDispatchMode`` that follows every aten op's output storages until they are freed): a count of
bytes, which does not depend on the device, so a CPU measures what a GPU will hold. Per completion token =
the difference of two step sizes divided by the difference of their completion tokens (fixed costs cancel). The last
table turns the measured slopes into the longest completions that fit at the shipped batch (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
from byte_counts import AllocatorPeak, LiveBytes, hidden_in_an_op  # noqa: E402
from medadapt.loss import CHUNK  # noqa: E402
from scratch import scratch_dir  # noqa: E402

R1 = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
          max_position_embeddings=131072, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)
R1_LAYERS = 28


def build_model(layers: int, folder: Path) -> str:
    """A random-weight folder of the R1 architecture with ``layers`` decoder layers (bf16), and the R1 tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = folder / f"r1-{layers}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **R1)).to(torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        AutoTokenizer.from_pretrained(REPO.parent / "shared" / "fixtures" / "deepseek-r1-distill-qwen-tokenizer"
                                      ).save_pretrained(path)
    return str(path)


def old_completion_logprobs(model, batch: dict, temperature: float) -> torch.Tensor:
    """The issue-22 scorer (rl/step.py before this change): every scored position's full-vocabulary fp32 logits and
    log-softmax at once, kept for backward (no temperature there; it does not change the bytes)."""
    from medadapt.model import unwrapped

    ids, mask, width, keep = batch["input_ids"], batch["attention_mask"], batch["prompt_width"], batch["score_mask"]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    base = unwrapped(model)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state[:, width - 1 : -1]
    rows, cols = keep.nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, cols]).float() / temperature
    picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, width:][rows, cols][:, None]).squeeze(-1)
    return torch.zeros(keep.shape, dtype=picked.dtype).index_put((rows, cols), picked)


def rollout(completions: int, tokens: int, prompt: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 150000, (prompt,), generator=g).tolist() for _ in range(completions)]
    outs = [torch.randint(100, 150000, (tokens,), generator=g).tolist() for _ in range(completions)]
    return prompts, outs


def measure(model, arm: str, completions: int, tokens: int, micro: int) -> int:
    """Peak live bytes of scoring + backward of one rollout by ``arm`` (checked against the CPU allocator's peak)."""
    from medadapt.rl.grpo import GRPOConfig
    from medadapt.rl.module import backprop
    from medadapt.rl.scoring import collate_scoring

    prompts, outs = rollout(completions, tokens)
    cfg = GRPOConfig(temperature=0.6, beta=0.0)

    def batch_of(rows):
        b = collate_scoring([prompts[i] for i in rows], [outs[i] for i in rows], [[1] * tokens for _ in rows], 0)
        b["advantages"] = torch.linspace(-1, 1, len(rows))
        return b

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), AllocatorPeak() as allocator, LiveBytes() as live:
        if arm == "issue-22":
            b = batch_of(list(range(completions)))
            logp = old_completion_logprobs(model, b, cfg.temperature)
            (-(logp * b["advantages"][:, None]).sum() / (completions * tokens)).backward()
        else:
            batches = [batch_of(list(range(i, min(i + micro, completions)))) for i in range(0, completions, micro)]
            backprop(model, batches, cfg, float(completions * tokens), 1)
    model.zero_grad(set_to_none=True)
    if hidden := hidden_in_an_op(live.peak, allocator.peak):
        print(f"  WARNING: {arm}, {completions} x {tokens}: {hidden}", flush=True)
    return live.peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="decoder layers of the reduced models")
    ap.add_argument("--completions", type=int, nargs=2, default=[2, 3],
                    help="two step sizes (completions; both ≥ 2, so both hold the LoRA gradients while scoring)")
    ap.add_argument("--tokens", type=int, nargs=2, default=[128, 256], help="two completion lengths (the slope)")
    ap.add_argument("--slope_chunk", type=int, default=16,
                    help="LM-head chunk while measuring the slopes: small, so that what a token costs the decoder, "
                         "not one head chunk, sets the peak, as at the real size (16 x 4,000 tokens against 1,024 rows)")
    ap.add_argument("--chunk", type=int, nargs=2, default=[64, 128],
                    help="two LM-head chunks (positions) on a short micro-batch (the first --tokens), where the chunk "
                         "sets the peak: its transient per row")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    for flag, (a, b) in (("--completions", args.completions), ("--tokens", args.tokens), ("--chunk", args.chunk)):
        if not 0 < a < b:
            ap.error(f"{flag} {a} {b}: two sizes, the first smaller (slopes divide by their difference), both > 0")
    if args.completions[0] < 2 or args.slope_chunk < 1:
        ap.error("--completions starts at 2 or more (both steps hold the LoRA gradients) and --slope_chunk is >= 1")
    import medadapt.rl.scoring as scoring
    from medadapt.model import load_model
    from medadapt.model_config import LoraConfig, ModelConfig

    work = scratch_dir("rl_memory-")
    report: dict = {"arms": {}, "per_layer": {}, "chunk_row": {}}
    (c1, c2), (t1, t2) = args.completions, args.tokens
    for layers in args.layers:
        model = load_model(ModelConfig(name_or_path=build_model(layers, work), load_in_4bit=True, compute_dtype="bfloat16",
                                       gradient_checkpointing=True, base_adapters=[], attn_implementation="sdpa"),
                           LoraConfig(r=16, alpha=32, dropout=0.0), training=True)
        scoring.CHUNK = args.slope_chunk
        for arm in ("issue-22", "medadapt"):  # medadapt: micro-batches of one completion
            peaks = {(c, t): measure(model, arm, c, t, 1) for c in (c1, c2) for t in (t1, t2)}
            step = (peaks[c2, t2] - peaks[c1, t2]) / ((c2 - c1) * t2)  # per completion token added to the step
            held = (peaks[c1, t2] - peaks[c1, t1]) / ((c1 if arm == "issue-22" else 1) * (t2 - t1))  # scored at once
            report["arms"][f"{arm}/{layers}L"] = {"peaks": {f"{c}x{t}": v for (c, t), v in peaks.items()},
                                                  "per_step_token": step, "per_held_token": held}
            print(f"  {layers} layer(s), {arm:>9}: peak {', '.join(f'{c}x{t}: {v / 2**20:,.0f} MiB' for (c, t), v in peaks.items())}"
                  f" -> {step / 1024:,.1f} KiB per completion token of the step, {held / 1024:,.1f} KiB per token "
                  "scored at once", flush=True)
        chunk_peaks = []
        for chunk in args.chunk:
            scoring.CHUNK = chunk
            chunk_peaks.append(measure(model, "medadapt", c1, t1, 1))
        report["chunk_row"][f"{layers}L"] = (chunk_peaks[1] - chunk_peaks[0]) / (args.chunk[1] - args.chunk[0])
        del model
    scoring.CHUNK = CHUNK
    print()
    for layers in args.layers:
        old, new = report["arms"][f"issue-22/{layers}L"], report["arms"][f"medadapt/{layers}L"]
        row = report["chunk_row"][f"{layers}L"]
        print(f"{layers} layer(s): a completion token added to the step costs {old['per_step_token'] / 1024:,.1f} KiB "
              f"(issue-22) vs {new['per_step_token'] / 1024:,.1f} KiB (medadapt); a token of the micro-batch being "
              f"scored {new['per_held_token'] / 1024:,.1f} KiB; the LM-head chunk {row / 1024:,.0f} KiB per row, "
              f"{CHUNK * row / 2**30:.2f} GiB at the shipped {CHUNK} rows")
    if len(args.layers) >= 2:  # per decoder layer and the rest (head, embeddings): extrapolate to 28 layers
        a, b = sorted(args.layers)[:2]
        for arm in ("issue-22", "medadapt"):
            pa, pb = (report["arms"][f"{arm}/{n}L"]["per_held_token"] for n in (a, b))
            layer = (pb - pa) / (b - a)
            report["per_layer"][arm] = {"per_layer": layer, "rest": pa - a * layer, "r1": pa + (R1_LAYERS - a) * layer}
        report["chunk_bytes"] = CHUNK * report["chunk_row"][f"{a}L"]
        fits(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def fits(report: dict) -> None:
    """Longest completions at the shipped batch (32 questions x 8, micro-batches of 16, 300-token prompts) on 24/48/80
    GB: scoring keeps per token what was measured (extrapolated to 28 layers), issue-22 held the whole step's tokens,
    medadapt one micro-batch's; HF generation holds the KV cache of all 256 sequences (2 x 28 layers x 2 KV heads x 128
    x 2 bytes = 28 KiB per token); ~2.5 GiB of weights, LoRA, optimizer state and workspace stay."""
    kv = 2 * R1_LAYERS * 2 * 128 * 2
    static = 2.5 * 2**30
    print("\nlongest completion (tokens) that fits, 32 x 8 completions per step, prompts ~300 tokens:")
    print("| card | scoring, issue-22 | scoring, medadapt (micro 16) | HF generation (KV cache) |")
    print("|---|---:|---:|---:|")
    report["fits"] = {}
    for gib in (24, 48, 80):
        free = gib * 2**30 - static
        old = free / (report["per_layer"]["issue-22"]["r1"] * 256) - 300
        new = (free - report["chunk_bytes"]) / (report["per_layer"]["medadapt"]["r1"] * 16) - 300
        gen = free / (kv * 256) - 300
        report["fits"][gib] = {"issue-22": old, "medadapt": new, "generation": gen}
        print(f"| {gib} GB | {max(old, 0):,.0f} | {max(new, 0):,.0f} | {max(gen, 0):,.0f} |")


if __name__ == "__main__":
    main()
