"""Generated tokens/s of vLLM vs batched HF ``generate`` on the same prompts and model, with and without LoRA.

    python benchmarks/generate_speed.py                       # SmolLM2-135M, 16 MedQA prompts, 128 new tokens
    python benchmarks/generate_speed.py --prompts 32 --max-new-tokens 256 --dtype bfloat16

Both arms decode greedily from the same token ids (the test stage's chat prompts) and stop at EOS. HF:
one left-padded batch through ``model.generate`` (``eval/generative.py``). vLLM: the worker the ``vllm``
backend runs (``eval/vllm_backend.py``), timed around ``LLM.generate`` only, not the engine start (which
it prints separately). With ``--lora`` both arms serve the same adapter (PEFT on the HF side, a
``LoRARequest`` on vLLM's). Printed: tokens/s of each, their ratio, identical outputs (token for token),
and identical extracted answers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from sft_packing import SHARED

from medadapt.eval.generative import GenerationConfig, collate_generate, extract_answer, gen_row, generate
from medadapt.eval.tasks import load_task
from medadapt.eval.vllm_backend import build_request, replies_of, run_worker, served_weights, vllm_python
from medadapt.model import LoraConfig, ModelConfig, load_model, load_tokenizer
from medadapt.weights import write_scaled_adapter


def hf_arm(cfg, adapter, tokenizer, rows, g):
    model = load_model(cfg, adapter=adapter, training=False).eval()
    batch = collate_generate([[r] for r in rows], tokenizer.pad_token_id, g)
    start = time.perf_counter()
    replies = generate(model, tokenizer, batch)
    seconds = time.perf_counter() - start
    return replies, text_tokens(tokenizer, replies), seconds


def text_tokens(tokenizer, replies) -> int:
    """Generated tokens, counted the same way for both arms: the replies' text re-encoded (EOS not counted)."""
    return sum(len(tokenizer.encode(r[0].text, add_special_tokens=False)) for r in replies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(SHARED / "data" / "benchmarks"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager (fast start, slower decoding)")
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
    items = load_task("medqa_4options", args.data)[: args.prompts]
    rows = [gen_row(tokenizer, it, g) for it in items]
    adapter_dir = tempfile.mkdtemp()
    write_scaled_adapter(cfg, adapter_dir, rho=0.05, lora=LoraConfig(r=16, alpha=32, dropout=0.0))
    python = vllm_python()
    print(f"model {args.model} ({args.dtype}), {len(rows)} MedQA prompts, ≤{args.max_new_tokens} new tokens, "
          f"greedy, {args.threads} threads each (vLLM cores {os.environ['VLLM_CPU_OMP_THREADS_BIND']}); vLLM "
          f"({'eager' if args.eager else 'compiled'}): {python}")
    for name, adapter in (("base", None), ("LoRA r16", adapter_dir)):
        hf, hf_tokens, hf_seconds = hf_arm(cfg, adapter, tokenizer, rows, g)
        model_dir, lora = served_weights(cfg, adapter, args.dtype)
        request = build_request(tokenizer, rows, g, model_dir, lora, args.dtype)
        started = time.perf_counter()
        response = run_worker(request, python)
        total = time.perf_counter() - started
        vl = replies_of(tokenizer, response, request["force"]["cue"])
        same_text = sum(a[0].text == b[0].text for a, b in zip(hf, vl))
        same_answer = sum(extract_answer(a[0].text, it) == extract_answer(b[0].text, it)
                          for a, b, it in zip(hf, vl, items))
        vl_tokens = text_tokens(tokenizer, vl)
        hf_rate, vl_rate = hf_tokens / hf_seconds, vl_tokens / response["seconds"]
        print(f"{name:<9} HF generate {hf_rate:7.1f} tok/s ({hf_tokens} tokens in {hf_seconds:.1f}s)   "
              f"vLLM {vl_rate:7.1f} tok/s ({vl_tokens} tokens in {response['seconds']:.1f}s; "
              f"engine start + exit {total - response['seconds']:.0f}s)")
        print(f"{'':<9} ratio vLLM/HF {vl_rate / hf_rate:.2f}x   identical outputs {same_text}/{len(rows)}   "
              f"identical answers {same_answer}/{len(rows)}")


if __name__ == "__main__":
    main()
