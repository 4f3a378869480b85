"""Everything that must be seen on a GPU, in one run: ``bash benchmarks/gpu_check.sh`` drives this file.

    python benchmarks/gpu_check.py --out OUT                 # on a GPU, with the files gpu_check.sh prepares
    python benchmarks/gpu_check.py --tiny --out OUT          # CPU proof: a 2-layer model, short sequences

Steps (each timed; a failing step is reported and the others still run):
  1. qlora      benchmarks/gpu_qlora.py's arms at seq 2,048 and 4,096 on the R1-Distill-Qwen-1.5B architecture
                (random weights, 4-bit nf4 through medadapt's loader): tokens/s, MFU, peak memory, ratios.
  2. fit        ``python -m medadapt fit`` of that architecture through the CLI, bf16-mixed, 8 steps on one
                repeated packed batch: train/loss must be finite and fall.
  3. fit_fp16   16-mixed with gradient clipping (fused AdamW asked for: medadapt must drop it), 2 steps.
  4. test       the leaderboard test stage, 20 items per task, with the adapter of step 2 (its metadata
                says nf4): items/s.
  5. generate   generative mode (HF backend), 2 items of 2 tasks, greedy with budget forcing.
Every figure goes to OUT/gpu_check.json and a readable OUT/gpu_check.md. Models are built from configs
(random weights): no hub. Data: the R1 tokenizer, the SFT sample and benchmark files, from ``--assets``
(gpu_check.sh --prepare copies them beside the wheels) or ``../shared`` when it is there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # gpu_qlora beside it; medadapt from the checkout (not installed there)


def assets(args) -> dict:
    root = Path(args.assets) if args.assets else None
    shared = REPO.parent / "shared"
    if root and root.exists():
        return {"tokenizer": root / "tokenizer", "sft": root / "sft.json", "benchmarks": root / "benchmarks"}
    return {"tokenizer": shared / "fixtures" / "deepseek-r1-distill-qwen-tokenizer",
            "sft": shared / "data" / "sft" / "medical_o1_reasoning_sample.json",
            "benchmarks": shared / "data" / "benchmarks"}


def build_model(arch: dict, tokenizer: Path, out: Path) -> str:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**{**arch, "vocab_size": max(arch["vocab_size"], len(tok))},
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def medadapt(args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "medadapt", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=log.parent).returncode
    if code:
        raise RuntimeError(f"python -m medadapt {args[0]} failed (exit {code}):\n" +
                           "".join(log.read_text().splitlines(keepends=True)[-25:]))


def fit_args(model: str, data: Path, run: Path, steps: int, precision: str, extra: list[str]) -> list[str]:
    import torch

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return ["fit", "--model.model.name_or_path", model, "--model.model.load_in_4bit", "true",
            "--model.lora", json.dumps({"r": 16, "alpha": 32, "dropout": 0.0}),
            "--model.optim.lr", "1e-3", "--model.optim.warmup_steps", "0",
            "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", str(data),
            "--data.max_rows", "null", "--data.val_fraction", "0", "--data.batch_size", "1",
            "--data.max_length", "2048", "--trainer.accelerator", accelerator, "--trainer.devices", "1",
            "--trainer.precision", precision, "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--run_dir", str(run), *extra]


def losses(run: Path) -> list[float]:
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where gpu_check.json, gpu_check.md and the logs go")
    ap.add_argument("--tiny", action="store_true", help="CPU proof: a 2-layer model and short sequences")
    ap.add_argument("--assets", default=str(REPO / ".gpu" / "assets"), help="tokenizer, SFT sample, benchmarks")
    args = ap.parse_args()
    import torch

    import gpu_qlora

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = assets(args)
    arch = gpu_qlora.TINY if args.tiny else gpu_qlora.R1_DISTILL_1_5B
    cuda = torch.cuda.is_available()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": args.tiny,
              "device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
              "steps": {}}
    precision = "bf16-mixed" if cuda else "32-true"

    def step(name, work):
        started = time.perf_counter()
        try:
            result = work() or {}
            report["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - started, 1), **result}
        except Exception as e:  # report and go on: one run must show every check
            report["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - started, 1),
                                     "error": f"{type(e).__name__}: {e}"[-3000:]}
            traceback.print_exc()
        print(f"gpu_check: {name}: {'ok' if report['steps'][name]['ok'] else 'FAILED'} "
              f"({report['steps'][name]['seconds']} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    model_dir = out / "model"
    step("build", lambda: {"model": build_model(arch, files["tokenizer"], model_dir)})
    seqs = ["128", "256"] if args.tiny else ["2048", "4096"]
    step("qlora", lambda: gpu_qlora.main(["--seq", *seqs, "--steps", "1" if args.tiny else "2", "--model-dir",
                                          str(model_dir)] + (["--tiny"] if args.tiny else [])))
    rows = json.loads(files["sft"].read_text())[:1]
    (out / "repeated.json").write_text(json.dumps(rows))  # one row: every step sees the same batch

    def fit(name: str, steps: int, prec: str, extra: list[str]) -> dict:
        run = out / name
        medadapt(fit_args(str(model_dir), out / "repeated.json", run, steps, prec, extra), out / f"{name}.log")
        seen = losses(run)
        if not seen or not all(math.isfinite(x) for x in seen):
            raise AssertionError(f"train/loss not finite: {seen}")
        return {"losses": seen}

    def fit_falls() -> dict:
        result = fit("fit", 3 if args.tiny else 8, precision, [])
        if not result["losses"][-1] < result["losses"][0]:
            raise AssertionError(f"train/loss did not fall on a repeated batch: {result['losses']}")
        return result

    step("fit", fit_falls)
    step("fit_fp16", lambda: fit("fit_fp16", 2, "16-mixed" if cuda else "32-true",
                                 ["--trainer.gradient_clip_val", "1.0", "--model.optim.fused", "true"]))

    def test(name: str, mode: list[str], tasks: list[str], limit: int) -> dict:
        results = out / name
        started = time.perf_counter()
        medadapt(["test", "--model.model.name_or_path", str(model_dir), "--model.lora", "null",
                  "--model.init_adapter", str(out / "fit" / "adapter"), "--model.model.gradient_checkpointing", "false",
                  "--model.results_dir", str(results), "--data", "medadapt.eval.data.BenchmarkDataModule",
                  "--data.local_dir", str(files["benchmarks"]), "--data.tasks", json.dumps(tasks),
                  "--data.limit", str(limit), "--data.allow_partial", "true", "--data.batch_size", "8", *mode,
                  "--trainer.accelerator", "gpu" if cuda else "cpu", "--trainer.devices", "1",
                  "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"], out / f"{name}.log")
        seconds = time.perf_counter() - started
        summary = json.loads((results / "results.json").read_text())
        return {"items": summary["n"], "items_per_s_with_start": summary["n"] / seconds,
                "loaded_in_4bit": summary["model"]["load_in_4bit"], "macro_acc": summary["macro_avg_acc"],
                **({"unparsable_rate": summary["unparsable_rate"], "forced_rate": summary["forced_rate"]}
                   if "unparsable_rate" in summary else {})}

    from medadapt.eval.tasks import TASKS

    step("test", lambda: test("test", [], TASKS, 2 if args.tiny else 20))
    step("generate", lambda: test("generate", ["--data.mode", "generate", "--data.generation", json.dumps(
        {"temperature": 0, "max_new_tokens": 8 if args.tiny else 64, "answer_budget": 4 if args.tiny else 16})],
        ["medqa_4options", "pubmedqa"], 2))
    write_markdown(report, out / "gpu_check.md")
    failed = [n for n, s in report["steps"].items() if not s["ok"]]
    print(f"gpu_check: {'all steps ok' if not failed else 'FAILED: ' + ', '.join(failed)}; {out / 'gpu_check.md'}")
    sys.exit(1 if failed else 0)


def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# GPU check: {report['device']} ({report['date']}, torch {report['torch']}{', tiny' if report['tiny'] else ''})",
             ""]
    qlora = report["steps"].get("qlora", {})
    for seq, arms in (qlora.get("seqs") or {}).items():
        lines += [f"## QLoRA SFT step, seq {seq}", "", "| arm | tokens/s | MFU | peak GiB | × baseline |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in arms.items():
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {mfu} | {mem} | {r['ratio_to_baseline']:.2f} |")
        lines.append("")
    lines += ["## Steps", "", "| step | ok | seconds | figures |", "|---|---|---:|---|"]
    for name, s in report["steps"].items():
        figures = {k: v for k, v in s.items() if k not in ("ok", "seconds", "seqs", "device", "matmul_params")}
        lines.append(f"| {name} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | {json.dumps(figures)[:300]} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
