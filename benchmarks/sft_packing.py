"""Supervised tokens/s of packed SFT vs the seed's approach (one example per row, padded to the batch's longest).

Both arms run in this process on the same model, the same SFT rows and the same number of optimizer
steps; the script prints each arm's throughput and padding fraction and the ratio.

    python benchmarks/sft_packing.py                                   # tiny random Qwen2, R1 tokenizer
    python benchmarks/sft_packing.py --model smollm2-135m-instruct     # the packaged real model (slow on CPU)

The baseline holds one example per row, padded at the right to the batch's longest; the packed arm fills
rows with several examples whose positions restart at each one (which isolates them: ``data/packing.py``).
Both go through the same forward, loss (``CausalLMModule.loss_sum``) and optimizer code, so the ratio is
packing's alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medadapt.data.packing import collate
from medadapt.data.reasoning import ReasoningSFTDataModule
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.module import CausalLMModule
from scratch import scratch_dir

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_model_dir() -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(SHARED / "fixtures" / "deepseek-r1-distill-qwen-tokenizer")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    path = scratch_dir("sft_packing-") / "tiny-qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(model, rows, pad_id, steps, batch_size) -> dict:
    """``steps`` optimizer steps over ``rows``; returns supervised tokens/s and padding fraction."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    holder = CausalLMModule.__new__(CausalLMModule)
    torch.nn.Module.__init__(holder)
    holder.model = model
    supervised = positions = padding = 0
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)][: steps + 1]
    for step, group in enumerate(batches):
        batch = collate(group, pad_id=pad_id, pad_to_multiple_of=1)
        if step == 1:  # the first step warms up allocators and kernels
            start, supervised, positions, padding = time.perf_counter(), 0, 0, 0
        loss, n = holder.loss_sum(batch)
        n = int(n)
        (loss / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        supervised += n
        positions += batch["input_ids"].numel()
        padding += int((batch["segment_ids"] == 0).sum())
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": supervised / elapsed, "padding": padding / positions, "seconds": elapsed,
            "supervised": supervised}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name/path; default: a tiny random Qwen2")
    ap.add_argument("--data", default=str(SHARED / "data" / "sft" / "medical_o1_reasoning_sample.json"))
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--load-in-4bit", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    name = args.model or tiny_model_dir()
    cfg = ModelConfig(name_or_path=name, load_in_4bit=args.load_in_4bit, compute_dtype="float32")
    data = ReasoningSFTDataModule(data_files=args.data, tokenizer=name, max_rows=None, val_fraction=0.0,
                                  max_length=args.max_length, target_template="<think>\n{cot}\n</think>\n\n{response}",
                                  truncate=True)  # every row in both arms (the default drops over-length rows)
    examples, _ = data.build_examples("fit")
    pad_id = data.get_tokenizer().pad_token_id
    results = {}
    for arm, pack in (("padded (seed)", False), ("packed (medadapt)", True)):
        data.pack = pack
        rows = data._to_rows(examples).rows
        model = load_model(cfg, LoraConfig(dropout=0.0), training=True)
        results[arm] = run(model, rows, pad_id, args.steps, args.batch_size)
        r = results[arm]
        print(f"{arm:18s} {r['tokens_per_s']:8.1f} supervised tok/s   padding {100 * r['padding']:5.1f}%   "
              f"({r['supervised']} supervised tokens in {r['seconds']:.1f}s)")
    ratio = results["packed (medadapt)"]["tokens_per_s"] / results["padded (seed)"]["tokens_per_s"]
    print(f"ratio packed/padded: {ratio:.2f}x  (model={args.model or 'tiny random Qwen2'}, max_length={args.max_length}, "
          f"batch={args.batch_size}, steps={args.steps}, torch threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
