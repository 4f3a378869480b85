"""Trained tokens/s of packed CPT blocks vs the seed notebook's approach (one snippet per row, padded).

Both arms run in this process on the same model and the same textbook snippets, through the same
training step (``sft_packing.run``: LoRA, AdamW, summed token loss); the script prints each arm's
throughput and padding fraction, and the ratio.

    python benchmarks/cpt_packing.py                                   # tiny random Qwen2, R1 tokenizer
    python benchmarks/cpt_packing.py --model smollm2-135m-instruct     # the packaged real model (slow on CPU)

Seed: each snippet (text + EOS, truncated to ``--block-size``) is one row; a batch is padded to its longest
row, with a 2D padding mask. medadapt: the snippets are concatenated and cut into full ``--block-size``
blocks (documents isolated by the 4D block mask), ``TextbooksDataModule``'s own rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sft_packing import SHARED, run, tiny_model_dir

from medadapt.data.textbooks import TextbooksDataModule
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name/path; default: a tiny random Qwen2")
    ap.add_argument("--data", default=str(SHARED / "data" / "corpus" / "textbooks_sample.json"))
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--seed-batch-size", type=int, default=8, help="snippets per step in the seed arm")
    ap.add_argument("--batch-size", type=int, default=2, help="blocks per step in the packed arm")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    torch.manual_seed(0)
    name = args.model or tiny_model_dir()
    cfg = ModelConfig(name_or_path=name, load_in_4bit=False, compute_dtype="float32")
    data = TextbooksDataModule(data_files=args.data, tokenizer=name, block_size=args.block_size, val_fraction=0.0)
    docs = data.tokenized_documents()
    seed_rows = [[{"input_ids": d[: args.block_size], "labels": d[: args.block_size]}] for d in docs]
    data.setup("fit")
    arms = {"one snippet per row (seed)": (seed_rows, args.seed_batch_size, False),
            "packed blocks (medadapt)": (data.train_rows.rows, args.batch_size, True)}
    pad_id = data.get_tokenizer().pad_token_id
    results = {}
    for arm, (rows, batch_size, packed) in arms.items():
        model = load_model(cfg, LoraConfig(dropout=0.0), training=True)
        results[arm] = r = run(model, rows, pad_id, args.steps, batch_size, packed=packed)
        print(f"{arm:28s} {r['tokens_per_s']:8.1f} trained tok/s   padding {100 * r['padding']:5.1f}%   "
              f"({r['supervised']} tokens in {r['seconds']:.1f}s)")
    seed, ours = results.values()
    print(f"ratio packed/seed: {ours['tokens_per_s'] / seed['tokens_per_s']:.2f}x  (model="
          f"{args.model or 'tiny random Qwen2'}, corpus={Path(args.data).name}: {len(docs)} snippets, "
          f"block={args.block_size}, steps={args.steps}, torch threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
