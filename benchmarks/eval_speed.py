"""Questions/s of medadapt's test stage vs lm-evaluation-harness's HF backend, side by side, same everything.

Both arms score the same seeded items with the same in-memory model and batch size on this machine; the
script checks that their predictions are identical and prints both rates and the ratio.

    pip install "lm-eval[hf]"
    python benchmarks/eval_speed.py                                   # packaged SmolLM2-135M-Instruct, CPU
    python benchmarks/eval_speed.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --limit 200   # on a GPU

Model loading is outside both timings. lm-eval runs one forward per (question, choice) request; medadapt
runs one forward per question when every choice is a single token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medadapt.eval.data import BenchmarkDataModule  # noqa: E402
from medadapt.eval.scoring import argmax_first  # noqa: E402
from medadapt.model_config import ModelConfig, resolve_model_path  # noqa: E402
from medadapt.module import CausalLMModule  # noqa: E402
from scratch import scratch_dir  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def run_medadapt(model_name: str, tasks: list[str], limit: int, batch_size: int, device: str):
    import lightning as L

    module = CausalLMModule(model=ModelConfig(name_or_path=model_name, load_in_4bit=False, compute_dtype="float32",
                                              gradient_checkpointing=False), lora=None,
                            results_dir=str(scratch_dir("eval_speed-")))
    data = BenchmarkDataModule(tasks=tasks, local_dir=str(SHARED), limit=limit, batch_size=batch_size,
                               tokenizer=model_name)
    data.setup("test")
    module.configure_model()
    trainer = L.Trainer(accelerator=device, devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    start = time.perf_counter()
    data.connect(module.tokenizer)
    trainer.test(module, data, verbose=False)
    elapsed = time.perf_counter() - start
    preds = {(r["task"], r["id"]): r["pred"] for r in module.harness.records}
    return data.items, preds, elapsed, module.model


def run_lm_eval(model, model_name: str, items, batch_size: int, workdir: Path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "eval"))
    from lm_eval_reference import hub_doc, write_task_yamls

    from medadapt.model_config import load_tokenizer

    by_task: dict[str, list] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    names, task_manager = write_task_yamls({t: [hub_doc(i) for i in its] for t, its in by_task.items()}, workdir)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(ModelConfig(name_or_path=model_name)), batch_size=batch_size)
    start = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=task_manager, num_fewshot=0, log_samples=True)
    elapsed = time.perf_counter() - start
    preds = {}
    for name, samples in res["samples"].items():
        task = name[len("ref_"):]
        for it, s in zip(by_task[task], samples):
            lls = [r[0] for r in s["filtered_resps"]]
            preds[(task, it.id)] = argmax_first(lls)
    return preds, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="medqa_4options,pubmedqa,mmlu_anatomy")
    ap.add_argument("--limit", type=int, default=20, help="items per task")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    device = "gpu" if torch.cuda.is_available() else "cpu"
    name = resolve_model_path(args.model)
    tasks = args.tasks.split(",")

    items, ours, t_ours, model = run_medadapt(name, tasks, args.limit, args.batch_size, device)
    theirs, t_theirs = run_lm_eval(model, name, items, args.batch_size, scratch_dir("eval_speed-lm_eval-"))
    same = sum(ours[k] == theirs[k] for k in ours)
    n = len(items)
    print(f"lm-eval HF backend  {n / t_theirs:7.2f} questions/s  ({n} questions in {t_theirs:.1f}s)")
    print(f"medadapt test stage {n / t_ours:7.2f} questions/s  ({n} questions in {t_ours:.1f}s)")
    print(f"ratio medadapt/lm-eval: {t_theirs / t_ours:.2f}x   identical predictions: {same}/{n}   "
          f"(model={args.model}, tasks={args.tasks}, limit={args.limit}, batch={args.batch_size}, device={device}, "
          f"torch threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
