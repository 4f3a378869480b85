"""Generate with vLLM's offline engine: token ids in, token ids out. Runs in vLLM's own interpreter.

    <vllm python> vllm_worker.py REQUEST.json RESPONSE.json       # one request, one engine (the test stage)
    <vllm python> vllm_worker.py --serve ENGINE.json              # one engine, requests on stdin (RL rollouts)

It imports nothing from medadapt (vLLM pins its own torch/transformers/numpy, so it usually lives in a
venv of its own: ``scripts/install.sh`` makes ``.venv-vllm``). The request names the model folder, an
optional LoRA adapter (``LoRARequest``), the prompts as token ids, the sampling settings and the budget
forcing settings (and, for benchmarks, warm-up prompts run before the timed call); the response holds
every sample's new token ids. Budget forcing runs a second round in the same engine: a sample that
stopped at the length limit with its thought still open gets the cue ids appended (``</think>`` + "The
final answer is") and ``force.budget`` more tokens.

The ``__main__`` guard matters: vLLM's multiprocess engine re-imports the main module in its workers.
"""

from __future__ import annotations

import json
import sys
import time


def contains(seq: list[int], sub: list[int]) -> bool:
    n = len(sub)
    return n > 0 and any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def cpu_engine_args(request: dict, max_model_len) -> dict:
    """On a CPU, prefill every prompt whole. With chunked prefill, vLLM discards the token sampled after a partial
    prefill and rewinds that request's seeded generator (``set_offset``), which CPU generators do not have:
    sampled generation (temperature > 0, per-request seeds) died with "CPU Generator does not use offset" as soon
    as a batch's prompts outgrew one step's token budget. Unchunked, the step budget must hold the longest
    sequence, so the context is sized to what this request needs (longest prompt + reply + forcing)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    length = max_model_len
    if length is None:
        s, force = request["sampling"], request.get("force") or {}
        prompts = request["prompts"] + ((request.get("warmup") or {}).get("prompts") or [])
        length = 8 + max(len(p) for p in prompts) + s["max_tokens"] + len(force.get("cue") or []) + (
            force.get("budget") or 0)
    return {"max_model_len": length, "enable_chunked_prefill": False, "max_num_batched_tokens": max(length, 8192)}


def chosen_logprobs(completion) -> list:
    """The sampler's log-probability of each token it chose (``logprobs_mode: processed_logprobs``: after temperature
    and top-k/top-p, what the token was drawn from); None where vLLM gave none."""
    out = []
    for token, candidates in zip(completion.token_ids, completion.logprobs or []):
        entry = candidates.get(token) if candidates is not None else None
        value = None if entry is None else float(entry.logprob)
        out.append(value if value is not None and value == value and value != float("-inf") else None)
    return out + [None] * (len(completion.token_ids) - len(out))


def build_engine(request: dict):
    """vLLM's offline engine for ``request`` (model, dtype, LoRA slot, parallelism, engine arguments)."""
    from vllm import LLM

    lora = request.get("lora")
    engine = {"model": request["model"], "tokenizer": request.get("tokenizer") or request["model"],
              "dtype": request.get("dtype", "auto"), "seed": request["sampling"]["seed"],
              "enforce_eager": request.get("enforce_eager", False),
              "tensor_parallel_size": request.get("tensor_parallel_size", 1),
              "max_model_len": request.get("max_model_len"), "trust_remote_code": request.get("trust_remote_code", False),
              "logprobs_mode": request.get("logprobs_mode")}
    if lora:
        engine.update(enable_lora=True, max_lora_rank=max(8, lora["rank"]), max_loras=1)
    engine.update(cpu_engine_args(request, engine.get("max_model_len")))
    engine.update(request.get("engine_args") or {})
    return LLM(**{k: v for k, v in engine.items() if v is not None})


def run(request: dict, llm=None) -> dict:
    """Generate ``request``'s prompts (on ``llm``, or a new engine): samples, and budget forcing when asked."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = llm or build_engine(request)
    lora = request.get("lora")
    lora_request = None
    if lora:
        from vllm.lora.request import LoRARequest

        # a LoRA that changes between requests (RL: the policy after each update) comes with a new id
        lora_request = LoRARequest(lora.get("name", "adapter"), lora.get("id", 1), lora["path"])
    s = request["sampling"]
    greedy = s["temperature"] == 0
    common = {"temperature": 0.0 if greedy else s["temperature"], "top_p": 1.0 if greedy else s["top_p"],
              "top_k": 0 if greedy else s.get("top_k", 0), "stop_token_ids": request["eos"], "detokenize": False,
              "skip_special_tokens": False, "logprobs": 0 if s.get("logprobs") else None}
    prompts = request["prompts"]
    warmup = request.get("warmup")  # benchmarks: other prompts run first, so lazy start-up work is not timed
    if warmup:
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in warmup["prompts"]],
                     SamplingParams(max_tokens=warmup["max_tokens"], **common), use_tqdm=False)
    started = time.perf_counter()
    # one request per prompt with its own seed: a prompt's samples do not depend on what it is batched with
    params = [SamplingParams(n=s["n"], max_tokens=s["max_tokens"], seed=s["seed"] + i, **common)
              for i in range(len(prompts))]
    first = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora_request,
                         use_tqdm=False)
    outputs = [[{"ids": list(c.token_ids), "finished": c.finish_reason == "stop", "forced": None,
                 "logprobs": chosen_logprobs(c) if s.get("logprobs") else None} for c in o.outputs] for o in first]
    force = request.get("force") or {}
    todo = [(i, k) for i, samples in enumerate(outputs) for k, sample in enumerate(samples)
            if force.get("budget") and request["thinking"][i] and not sample["finished"]
            and not contains(sample["ids"], force["close"])]
    if todo:
        again = [TokensPrompt(prompt_token_ids=prompts[i] + outputs[i][k]["ids"] + force["cue"]) for i, k in todo]
        more = llm.generate(again, [SamplingParams(n=1, max_tokens=force["budget"], seed=s["seed"] + 7919 * (i + 1) + k,
                                                   **common) for i, k in todo],
                            lora_request=lora_request, use_tqdm=False)
        for (i, k), o in zip(todo, more):
            outputs[i][k]["forced"] = list(o.outputs[0].token_ids)
            outputs[i][k]["forced_finished"] = o.outputs[0].finish_reason == "stop"
            if s.get("logprobs"):
                outputs[i][k]["forced_logprobs"] = chosen_logprobs(o.outputs[0])
    seconds = time.perf_counter() - started
    tokens = sum(len(x["ids"]) + len(x["forced"] or []) for samples in outputs for x in samples)
    return {"outputs": outputs, "seconds": seconds, "generated_tokens": tokens}


def serve(engine_path: str) -> None:
    """``--serve ENGINE.json``: one engine for many requests (RL rollouts, each with the current LoRA). Each line on
    stdin is "REQUEST.json RESPONSE.json"; the answer is written there and announced by a ``MEDADAPT_DONE`` line
    on stdout (vLLM's own output goes to stderr); end of stdin ends the worker."""
    import os

    with open(engine_path) as f:
        llm = build_engine(json.load(f))
    print("MEDADAPT_READY", flush=True)
    for line in sys.stdin:
        request_path, response_path = line.split()
        with open(request_path) as f:
            response = run(json.load(f), llm)
        with open(response_path + ".tmp", "w") as f:
            json.dump(response, f)
        os.replace(response_path + ".tmp", response_path)
        print("MEDADAPT_DONE", response_path, flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "--serve":
        serve(argv[1])
        return
    request_path, response_path = argv
    with open(request_path) as f:
        request = json.load(f)
    response = run(request)
    with open(response_path + ".tmp", "w") as f:
        json.dump(response, f)
    import os

    os.replace(response_path + ".tmp", response_path)


if __name__ == "__main__":
    main(sys.argv[1:])
