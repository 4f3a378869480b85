"""GRPO step time as ``python -m medadapt fit --config configs/demo/rl.yaml`` runs it, split into generation and update.

    python benchmarks/rl_step.py                                  # CPU: packaged SmolLM2-135M, the demo RL config
    python benchmarks/rl_step.py --model-dir DIR --gpu            # a GPU: any model folder (gpu_check: the 1.5B arch)

The RL config is parsed by medadapt's CLI (``build_cli``) and run with ``Trainer.fit`` for warm-up + timed
steps: the module's real training step under the Trainer's precision plugin. The step's sampling
(``rl.step.sample``: HF ``generate`` of G completions per question) is timed by wrapping that function; the
rest of the step (policy and reference log-probabilities, loss, backward, optimizer) is the update. Printed per
step and as medians: total, generation and update seconds, generated tokens/s, and the generation share of the
step, which says where a faster engine (vLLM) would pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
SHARED = REPO.parent / "shared"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="smollm2-135m-instruct", help="model (default: packaged SmolLM2)")
    ap.add_argument("--gpu", action="store_true", help="bf16-mixed on CUDA (default: the demo's CPU settings)")
    ap.add_argument("--group", type=int, default=4, help="completions per question")
    ap.add_argument("--questions", type=int, default=2, help="questions per step")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sft", default=str(SHARED / "data" / "sft" / "medical_o1_reasoning_sample.json"))
    ap.add_argument("--benchmarks", default=str(SHARED / "data" / "benchmarks"))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    import medadapt.rl.step as step
    from medadapt.cli import build_cli

    timings = {"generation": [], "tokens": []}
    original = step.sample

    def timed_sample(model, tokenizer, batch, cfg, greedy=False):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = original(model, tokenizer, batch, cfg, greedy)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if not greedy:
            timings["generation"].append(time.perf_counter() - started)
            timings["tokens"].append(int(out["completion_mask"].sum()))
        return out

    step.sample = timed_sample
    work = Path(tempfile.mkdtemp(prefix="rl_step-"))
    source = json.dumps([{"name": "o1", "data_files": args.sft, "options_field": "options",
                          "answer_field": "answer_idx", "answer_format": "letter", "on_bad_row": "skip"}])
    overrides = ["--config", str(REPO / "configs" / "demo" / "rl.yaml"), "--model.model.name_or_path", args.model_dir,
                 "--model.model.base_adapters", "[]", "--model.adapter_dir", str(work / "adapter"),
                 "--model.rl.group_size", str(args.group), "--model.rl.max_new_tokens", str(args.max_new_tokens),
                 "--data.init_args.sources", source, "--data.init_args.pubmedqa", "null",
                 "--data.init_args.benchmarks_dir", args.benchmarks, "--data.init_args.batch_size", str(args.questions),
                 "--data.init_args.decontaminate", "false", "--data.init_args.max_questions", "64",
                 "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(work)]
    if args.gpu:
        overrides += ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
                      "--model.model.compute_dtype", "bfloat16"]
    cli = build_cli(overrides, run=False)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    steps: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.started)

    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [Clock()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    timed = slice(args.warmup, None)
    total, gen, tokens = steps[timed], timings["generation"][timed], timings["tokens"][timed]
    update = [t - g for t, g in zip(total, gen)]
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.gpu else "CPU",
              "model": args.model_dir, "group": args.group, "questions": args.questions,
              "max_new_tokens": args.max_new_tokens, "step_s": statistics.median(total),
              "generation_s": statistics.median(gen), "update_s": statistics.median(update),
              "generated_tokens_per_s": sum(tokens) / sum(gen), "generation_share": sum(gen) / sum(total)}
    for i, (t, g) in enumerate(zip(total, gen)):
        print(f"  step {i + 1}: {t:.2f} s = generation {g:.2f} s + update {t - g:.2f} s")
    print(f"rl_step: {report['device']}, {args.model_dir}, {args.questions} questions x {args.group} completions, "
          f"≤{args.max_new_tokens} new tokens: step {report['step_s']:.2f} s (median), generation "
          f"{report['generation_s']:.2f} s ({100 * report['generation_share']:.0f}%, "
          f"{report['generated_tokens_per_s']:.0f} tokens/s), update {report['update_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
