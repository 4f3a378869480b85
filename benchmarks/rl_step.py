"""GRPO step time and memory as ``python -m medadapt fit`` runs it, split into generation and update.

    python benchmarks/rl_step.py                                   # CPU: packaged SmolLM2-135M, configs/demo/rl.yaml
    python benchmarks/rl_step.py --model-dir DIR --gpu             # a GPU, small step (gpu_check: the 1.5B arch)
    python benchmarks/rl_step.py --model-dir DIR --gpu --full      # a GPU: configs/rl.yaml as shipped (32 x 8, 4,096)

The RL config is parsed by medadapt's CLI (``build_cli``) and run with ``Trainer.fit`` for warm-up + timed steps:
the module's real training step under the Trainer's precision plugin. Each step's phases come from the module's own
clock (``rl/generation_s``: sampling; ``rl/update_s``: scoring π_old/reference and the μ updates), with the rollout's
tokens/s and, on a GPU, the peak memory of the step. ``--full`` keeps every setting of configs/rl.yaml (questions,
G, the 4,096-token budget, micro-batches) and only swaps the model folder and the questions (the shared o1 sample):
a random-weight model never stops early, so every completion runs to the budget — the worst case of a step, which
is what a run must budget for. Printed: per step and medians, and the full-run estimate at the config's max_steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
from scratch import scratch_dir  # noqa: E402
SHARED = REPO.parent / "shared"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="smollm2-135m-instruct", help="model (default: packaged SmolLM2)")
    ap.add_argument("--gpu", action="store_true", help="configs/rl.yaml's precision (bf16-mixed) on CUDA")
    ap.add_argument("--full", action="store_true", help="configs/rl.yaml's step as shipped (needs --gpu)")
    ap.add_argument("--group", type=int, default=4, help="completions per question (not with --full)")
    ap.add_argument("--questions", type=int, default=2, help="questions per step (not with --full)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="completion budget (not with --full)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sft", default=str(SHARED / "data" / "sft" / "medical_o1_reasoning_sample.json"))
    ap.add_argument("--benchmarks", default=str(SHARED / "data" / "benchmarks"))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medadapt.lightning_cli import build_cli

    work = scratch_dir("rl_step-")
    config = REPO / "configs" / ("rl.yaml" if args.full else "demo" / Path("rl.yaml"))
    source = json.dumps([{"name": "o1", "data_files": args.sft, "options_field": "options",
                          "answer_field": "answer_idx", "answer_format": "letter", "on_bad_row": "skip"}])
    overrides = ["--config", str(config), "--model.model.name_or_path", args.model_dir,
                 "--model.model.base_adapters", "[]", "--model.adapter_dir", str(work / "adapter"),
                 "--data.init_args.sources", source, "--data.init_args.pubmedqa", "null", "--data.init_args.quotas",
                 "null", "--data.init_args.benchmarks_dir", args.benchmarks, "--data.init_args.decontaminate", "false",
                 "--data.init_args.max_questions", "400", "--data.init_args.num_workers", "0",
                 "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(work)]
    if not args.full:
        overrides += ["--model.rl.group_size", str(args.group), "--model.rl.max_new_tokens", str(args.max_new_tokens),
                      "--data.init_args.batch_size", str(args.questions)]
    if args.gpu:
        overrides += ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
                      "--model.model.compute_dtype", "bfloat16"]
    cli = build_cli(overrides, run=False)
    steps: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if torch.cuda.is_available() and args.gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            stats = getattr(module, "last_rl_stats", None)
            if stats is not None:
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and args.gpu else None
                steps.append({**stats, "peak_gib": peak})
                module.last_rl_stats = None

    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [Record()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timed = steps[args.warmup:]
    rl, data = cli.model.rl_cfg, cli.datamodule
    median = {k: statistics.median(s[k] for s in timed) for k in (
        "rl/step_s", "rl/generation_s", "rl/update_s", "rl/rollout_tokens_per_s", "rl/completion_length",
        "rl/loss_tokens")}
    max_steps = 200 if args.full else None
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.gpu else "CPU",
              "model": args.model_dir, "config": str(config.relative_to(REPO)), "questions": data.batch_size,
              "group": rl.group_size, "max_new_tokens": rl.max_new_tokens, "micro_batch_size": rl.micro_batch_size,
              "step_s": median["rl/step_s"], "generation_s": median["rl/generation_s"],
              "update_s": median["rl/update_s"], "generation_share": median["rl/generation_s"] / median["rl/step_s"],
              "rollout_tokens_per_s": median["rl/rollout_tokens_per_s"],
              "completion_length": median["rl/completion_length"], "loss_tokens": median["rl/loss_tokens"],
              "peak_gib": max((s["peak_gib"] or 0) for s in timed) if args.gpu else None,
              "run_hours_at_max_steps": median["rl/step_s"] * max_steps / 3600 if max_steps else None}
    for i, s in enumerate(timed):
        print(f"  step {i + 1}: {s['rl/step_s']:.2f} s = generation {s['rl/generation_s']:.2f} s + update "
              f"{s['rl/update_s']:.2f} s; completions {s['rl/completion_length']:.0f} tokens on average"
              + (f"; peak {s['peak_gib']:.1f} GiB" if s["peak_gib"] else ""))
    print(f"rl_step: {report['device']}, {args.model_dir}, {report['questions']} questions x {report['group']} "
          f"completions, <={report['max_new_tokens']} new tokens: step {report['step_s']:.2f} s (median), generation "
          f"{report['generation_s']:.2f} s ({100 * report['generation_share']:.0f}%, {report['rollout_tokens_per_s']:.0f}"
          f" tokens/s), update {report['update_s']:.2f} s"
          + (f"; peak {report['peak_gib']:.1f} GiB" if report["peak_gib"] else "")
          + (f"; {max_steps} steps ≈ {report['run_hours_at_max_steps']:.1f} h" if max_steps else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
