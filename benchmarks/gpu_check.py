"""Everything that must be seen on a GPU, in one run: ``bash benchmarks/gpu_check.sh`` drives this file.

    python benchmarks/gpu_check.py --out OUT                 # on a GPU, with the files gpu_check.sh prepares
    python benchmarks/gpu_check.py --tiny --out OUT          # CPU proof: a 2-layer model, short rows

Steps (each timed; a failing step is reported and the others still run), sized to finish in under 5 minutes
from a cold start on one H100/H200 so that a second attempt fits one 15-minute device session:
  1. build      the R1-Distill-Qwen-1.5B architecture with random weights (bf16), saved once.
  2. fit_speed  benchmarks/fit_speed.py: the seed's transformers.Trainer, then configs/sft.yaml through medadapt's
                CLI and Trainer.fit, then every lever alone (issue 26's bf16 frozen base, LoRA forward, compile,
                dropout; attention, checkpointing, micro-batch x accumulation, Liger, fp16) and together, and
                checkpointing at 4,096 tokens (peak memory), each arm in its own process, each attention path
                checked packed vs alone; the arms that would start past ``--fit-budget-s`` are reported as
                skipped, so the main arms never are.
  3. test       the leaderboard test stage, log-likelihood, ``bf16-true``, 20 items x 9 tasks, with the
                adapter fit_speed's sft.yaml arm exported (its metadata says nf4): items/s, start-up excluded.
  4. generate   generative mode, HF backend, 16 MedQA prompts in one batch of 16, greedy, 256 new tokens:
                generated tokens/s, start-up excluded.
  5. rl_step    benchmarks/rl_step.py on the 1.5B architecture: a GRPO step (2 questions x 8 completions, 128 new
                tokens) split into generation and update, with its peak memory. (The full configs/rl.yaml step,
                32 x 8 x 4,096 tokens, takes minutes: ``rl_step.py --gpu --full`` on its own.)
Every figure goes to OUT/gpu_check.json and one readable OUT/gpu_check.md. Models are built from configs
(random weights) into a temporary folder, never under OUT (which the device tool ships back): no hub. Data: the R1 tokenizer, the SFT sample and benchmark files, from ``--assets``
(gpu_check.sh --prepare copies them beside the wheels) or ``../shared`` when it is there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # fit_speed beside it; medadapt from the checkout (not installed there)
from scratch import scratch_dir  # noqa: E402


#: the fit_speed arms the CPU proof (``--tiny``) runs: the seed, the shipped config, the 4,096 checkpointing arm, the
#: attention baseline, and every step lever at once (``all``: varlen attention on CPU, checkpointing off, 3 × 1
#: micro-batches). Each other arm is one of these with other overrides, which tests/test_gpu_check.py parses for
#: every arm; each arm's process costs ~14 s of the suite.
TINY_ARMS = ("seed-trainer", "sft.yaml", "ckpt-4096", "sdpa", "all")


def assets(args) -> dict:
    root = Path(args.assets) if args.assets else None
    shared = REPO.parent / "shared"
    if root and root.exists():
        return {"tokenizer": root / "tokenizer", "sft": root / "sft.json", "benchmarks": root / "benchmarks"}
    return {"tokenizer": shared / "fixtures" / "deepseek-r1-distill-qwen-tokenizer",
            "sft": shared / "data" / "sft" / "medical_o1_reasoning_sample.json",
            "benchmarks": shared / "data" / "benchmarks"}


def medadapt(args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "medadapt", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=log.parent).returncode
    if code:
        raise RuntimeError(f"python -m medadapt {args[0]} failed (exit {code}):\n" +
                           "".join(log.read_text().splitlines(keepends=True)[-25:]))


def test_stage(out: Path, model_dir: str, adapter: str | None, benchmarks: Path, name: str, tasks: list[str],
               limit: int, extra: list[str]) -> dict:
    """``python -m medadapt test`` on the built model (+ adapter); its results.json figures."""
    import torch

    cuda = torch.cuda.is_available()
    results = out / name
    medadapt(["test", "--model.model.name_or_path", model_dir, "--model.lora", "null",
              *(["--model.init_adapter", adapter] if adapter else []),
              "--model.model.gradient_checkpointing", "false", "--model.results_dir", str(results),
              "--data", "medadapt.eval.data.BenchmarkDataModule", "--data.local_dir", str(benchmarks),
              "--data.tasks", json.dumps(tasks), "--data.limit", str(limit), "--data.allow_partial", "true",
              "--trainer.accelerator", "gpu" if cuda else "cpu", "--trainer.devices", "1",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra], out / f"{name}.log")
    summary = json.loads((results / "results.json").read_text())
    figures = {"items": summary["n"], "stage_seconds": summary["seconds"], "items_per_s": summary["n"] / summary["seconds"],
               "loaded_in_4bit": summary["model"]["load_in_4bit"], "macro_acc": summary["macro_avg_acc"]}
    generated = sum(m.get("generated_tokens", 0) for m in summary["tasks"].values())
    if generated:
        figures.update({"generated_tokens": generated, "generated_tokens_per_s": generated / summary["seconds"],
                        "unparsable_rate": summary["unparsable_rate"]})
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where gpu_check.json, gpu_check.md and the logs go")
    ap.add_argument("--tiny", action="store_true", help="CPU proof: a 2-layer model and short rows")
    ap.add_argument("--assets", default=str(REPO / ".gpu" / "assets"), help="tokenizer, SFT sample, benchmarks")
    ap.add_argument("--fit-budget-s", type=float, default=120.0, help="fit_speed arms start only before this")
    args = ap.parse_args()
    import torch

    import fit_speed

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = assets(args)
    arch = fit_speed.TINY if args.tiny else fit_speed.R1_DISTILL_1_5B
    cuda = torch.cuda.is_available()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": args.tiny,
              "device": torch.cuda.get_device_name() if cuda else "CPU", "torch": torch.__version__,
              "command": "bash benchmarks/gpu_check.sh" + (" --tiny" if args.tiny else ""), "steps": {}}

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

    # the 3.5 GB random-weight model and every cache live outside OUT (the device tool ships OUT back)
    scratch = scratch_dir("gpu_check-")
    os.environ.setdefault("MEDADAPT_CACHE", str(scratch / "cache"))
    model_dir = str(scratch / "model")
    step("build", lambda: {"model": fit_speed.build_model_dir(arch, str(files["tokenizer"]), scratch / "model")})

    def speed() -> dict:
        # the CPU proof: one arm of each kind, all of them (no budget); on a GPU every arm within the budget
        scope = ["--tiny", "--arms", *TINY_ARMS] if args.tiny else ["--budget-s", str(args.fit_budget_s)]
        figures = fit_speed.main(["--model-dir", model_dir, "--tokenizer", str(files["tokenizer"]), "--sft",
                                  str(files["sft"]), "--json", str(out / "fit_speed.json")] + scope)
        failed = [n for n, r in figures["arms"].items() if r.get("error")]
        if "tokens_per_s" not in figures["arms"].get("sft.yaml", {}) or failed:
            raise AssertionError(f"fit_speed arms failed or disagree: {failed or ['sft.yaml']}")
        return {"arms": len(figures["arms"])}

    step("fit_speed", speed)
    speed_report = json.loads((out / "fit_speed.json").read_text()) if (out / "fit_speed.json").exists() else None
    adapter = ((speed_report or {}).get("arms", {}).get("sft.yaml") or {}).get("adapter")

    from medadapt.eval.tasks import TASKS

    bf16 = ["--trainer.precision", "bf16-true"] if cuda else []
    step("test", lambda: test_stage(out, model_dir, adapter, files["benchmarks"], "test", TASKS, 2 if args.tiny else 20,
                                    ["--data.batch_size", "8", *bf16]))
    generation = {"temperature": 0, "max_new_tokens": 8 if args.tiny else 256, "answer_budget": 0}
    step("generate", lambda: test_stage(out, model_dir, None, files["benchmarks"], "generate", ["medqa_4options"],
                                        4 if args.tiny else 16, ["--data.mode", "generate", "--data.batch_size", "16",
                                                                 "--data.generation", json.dumps(generation), *bf16]))
    import rl_step

    rl_args = ["--model-dir", model_dir, "--benchmarks", str(files["benchmarks"]), "--sft", str(files["sft"]),
               "--json", str(out / "rl_step.json")]
    rl_args += (["--group", "2", "--max-new-tokens", "4", "--steps", "1"] if args.tiny else
                ["--gpu", "--group", "8", "--questions", "2", "--max-new-tokens", "128", "--steps", "2"])
    step("rl_step", lambda: {k: v for k, v in rl_step.main(rl_args).items() if k in (
        "step_s", "generation_s", "update_s", "rollout_tokens_per_s", "generation_share", "peak_gib")})
    write_markdown(report, speed_report, out / "gpu_check.md")
    failed = [n for n, s in report["steps"].items() if not s["ok"]]
    print(f"gpu_check: {'all steps ok' if not failed else 'FAILED: ' + ', '.join(failed)}; {out / 'gpu_check.md'}")
    sys.exit(1 if failed else 0)


def write_markdown(report: dict, speed: dict | None, path: Path) -> None:
    import fit_speed

    lines = [f"# GPU check: {report['device']} ({report['date']}, torch {report['torch']}"
             f"{', tiny' if report['tiny'] else ''})", "", f"Command: `{report['command']}`", ""]
    if speed:
        lines += fit_speed.markdown(speed)
    lines += ["## Steps", "", "| step | ok | seconds | figures |", "|---|---|---:|---|"]
    for name, s in report["steps"].items():
        figures = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()
                   if k not in ("ok", "seconds")}
        lines.append(f"| {name} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | {json.dumps(figures)[:400]} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
