"""Generated tokens/s of vLLM vs batched HF ``generate`` on the same prompts and model, with and without LoRA.

    python benchmarks/generate_speed.py                       # SmolLM2-135M, 16 MedQA prompts, 128 new tokens
    python benchmarks/generate_speed.py --arms base --repeats 3 --split --max-new-tokens 512
    python benchmarks/generate_speed.py --prompts 32 --dtype bfloat16

Both arms decode greedily from the same token ids (the test stage's chat prompts) and stop at EOS. HF:
one left-padded batch through ``model.generate`` (``eval/generative.py``). vLLM: the worker the ``vllm``
backend runs (``eval/vllm_backend.py``), timed around ``LLM.generate`` only, not the engine start (which
it prints separately). In the ``lora`` arm both serve the same adapter (PEFT on the HF side, a
``LoRARequest`` on vLLM's). Printed: tokens/s of each, their ratio, identical outputs (token for token)
and identical extracted answers; with ``--repeats`` the median ratio and its range (each repeat is one HF
call and a fresh vLLM engine). Both arms first generate a few tokens for other prompts, untimed, so lazy
start-up work is left out as the engine start is (``--cold`` times the first calls instead). ``--split``
also times each arm on one new token (the prompt pass alone) and prints the rest per decoding step, which
says where a ratio comes from: vLLM skips HF's left padding in the prompt pass, and finished rows and
Python overhead while decoding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
from sft_packing import SHARED
from scratch import scratch_dir

from medadapt.eval.generative import GenerationConfig, collate_generate, extract_answer, gen_row, generate
from medadapt.eval.tasks import load_task
from medadapt.eval.vllm_backend import build_request, replies_of, run_worker, served_weights, vllm_python
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig, load_tokenizer
from medadapt.weights import write_scaled_adapter

WARMUP_TOKENS = 8  # new tokens per warm-up prompt


def hf_arm(model, tokenizer, rows, g):
    """(replies, generated tokens per reply, seconds) of one batched HF generate call."""
    batch = collate_generate([[r] for r in rows], tokenizer.pad_token_id, g)
    start = time.perf_counter()
    replies = generate(model, tokenizer, batch)
    seconds = time.perf_counter() - start
    return replies, reply_tokens(tokenizer, replies), seconds


def vllm_arm(cfg, adapter, tokenizer, rows, g, dtype, python, warmup=None):
    """(replies, generated tokens per reply, seconds of LLM.generate, seconds of engine start + exit) of one worker run;
    ``warmup`` (other rows) runs first in the same engine, untimed."""
    model_dir, lora = served_weights(cfg, adapter, dtype)
    request = build_request(tokenizer, rows, g, model_dir, lora, dtype)
    if warmup:
        request["warmup"] = {"prompts": [r.input_ids for r in warmup], "max_tokens": WARMUP_TOKENS}
    started = time.perf_counter()
    response = run_worker(request, python)
    total = time.perf_counter() - started
    replies = replies_of(tokenizer, response, request["force"]["cue"])
    return replies, reply_tokens(tokenizer, replies), response["seconds"], total - response["seconds"]


def reply_tokens(tokenizer, replies) -> list[int]:
    """Generated tokens of each reply, counted the same way for both arms: its text re-encoded (EOS not counted).
    Their sum is the arm's output; their maximum less one, its decoding steps after the first token."""
    return [len(tokenizer.encode(r[0].text, add_special_tokens=False)) for r in replies]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(SHARED / "data" / "benchmarks"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager (fast start, slower decoding)")
    ap.add_argument("--arms", default="base,lora", help="comma-separated: base, lora")
    ap.add_argument("--repeats", type=int, default=1, help="runs per arm; the median ratio and its range are printed")
    ap.add_argument("--split", action="store_true", help="also time the prompt pass alone (1 new token) per arm")
    ap.add_argument("--cold", action="store_true",
                    help="no warm-up: time each engine's first call (by default both arms first generate "
                         f"{WARMUP_TOKENS} tokens for as many other prompts, untimed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # the same cores for both arms: vLLM's CPU default binds one thread per physical core and reserves one
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    cfg = ModelConfig(name_or_path=args.model, load_in_4bit=False, compute_dtype=args.dtype, base_adapters=[],
                      gradient_checkpointing=False)
    tokenizer = load_tokenizer(cfg)
    g = GenerationConfig(temperature=0.0, max_new_tokens=args.max_new_tokens, answer_budget=0, open_think=False,
                         enforce_eager=args.eager)
    task = load_task("medqa_4options", args.data)
    items = task[: args.prompts]
    rows = [gen_row(tokenizer, it, g) for it in items]
    warm = None if args.cold else [gen_row(tokenizer, it, g) for it in task[args.prompts : 2 * args.prompts]]
    adapter_dir = str(scratch_dir("generate_speed-"))
    write_scaled_adapter(cfg, adapter_dir, rho=0.05, lora=LoraConfig(r=16, alpha=32, dropout=0.0))
    python = vllm_python()
    print(f"model {args.model} ({args.dtype}), {len(rows)} MedQA prompts ({sum(len(r.input_ids) for r in rows)} "
          f"tokens, longest {max(len(r.input_ids) for r in rows)}), ≤{args.max_new_tokens} new tokens, greedy, "
          f"{args.threads} threads each (vLLM cores {os.environ['VLLM_CPU_OMP_THREADS_BIND']}); vLLM "
          f"({'eager' if args.eager else 'compiled'}): {python}; "
          f"{'cold (first calls timed)' if args.cold else 'after an untimed warm-up on other prompts'}")
    arms = {"base": ("base", None), "lora": ("LoRA r16", adapter_dir)}
    for key in args.arms.split(","):
        name, adapter = arms[key.strip()]
        model = load_model(cfg, adapter=adapter, training=False).eval()
        if warm:
            hf_arm(model, tokenizer, warm, replace(g, max_new_tokens=WARMUP_TOKENS))
        ratios = []
        for _ in range(args.repeats):
            hf, hf_lengths, hf_seconds = hf_arm(model, tokenizer, rows, g)
            vl, vl_lengths, vl_seconds, overhead = vllm_arm(cfg, adapter, tokenizer, rows, g, args.dtype, python, warm)
            hf_tokens, vl_tokens = sum(hf_lengths), sum(vl_lengths)
            same_text = sum(a[0].text == b[0].text for a, b in zip(hf, vl))
            same_answer = sum(extract_answer(a[0].text, it) == extract_answer(b[0].text, it)
                              for a, b, it in zip(hf, vl, items))
            hf_rate, vl_rate = hf_tokens / hf_seconds, vl_tokens / vl_seconds
            ratios.append(vl_rate / hf_rate)
            print(f"{name:<9} HF generate {hf_rate:7.1f} tok/s ({hf_tokens} tokens in {hf_seconds:.1f}s)   "
                  f"vLLM {vl_rate:7.1f} tok/s ({vl_tokens} tokens in {vl_seconds:.1f}s; "
                  f"engine start + exit {overhead:.0f}s)", flush=True)
            print(f"{'':<9} ratio vLLM/HF {ratios[-1]:.2f}x   identical outputs {same_text}/{len(rows)}   "
                  f"identical answers {same_answer}/{len(rows)}", flush=True)
            if args.split:
                one = replace(g, max_new_tokens=1)
                hf_first = hf_arm(model, tokenizer, rows, one)[2]
                vl_first = vllm_arm(cfg, adapter, tokenizer, rows, one, args.dtype, python, warm)[2]
                hf_step = (hf_seconds - hf_first) / (max(hf_lengths) - 1) * 1000
                vl_step = (vl_seconds - vl_first) / (max(vl_lengths) - 1) * 1000
                print(f"{'':<9} prompt pass HF {hf_first:.1f}s vLLM {vl_first:.1f}s ({hf_first / vl_first:.2f}x)   "
                      f"per decoding step HF {hf_step:.0f} ms vLLM {vl_step:.0f} ms ({hf_step / vl_step:.2f}x)",
                      flush=True)
        if args.repeats > 1:
            print(f"{name:<9} median ratio {statistics.median(ratios):.2f}x over {args.repeats} runs "
                  f"(range {min(ratios):.2f}–{max(ratios):.2f}x)", flush=True)
        del model


if __name__ == "__main__":
    main()
