"""The vllm generation backend: the same test stage, files and answers as the HF backend, from vLLM.

These run the CPU build of vLLM (``.venv-vllm``, made by scripts/install.sh) on SmolLM2-135M (vLLM's CPU
attention needs head_dim ≥ 32; the suite's tiny models have 16). They skip only where no vLLM interpreter
exists, and never under CI. fp32 greedy decoding is token-identical between the two engines on this
model (issue 13 measured 16/16); the tests require identical answers and nearly identical texts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from medadapt.eval.vllm_backend import VLLMUnavailableError, served_weights, vllm_python
from medadapt.model_config import LoraConfig, ModelConfig

from ..conftest import DATA, assert_close_to_scale

SMOL = "smollm2-135m-instruct"


def have_vllm(monkeypatch) -> None:
    try:
        vllm_python()
    except VLLMUnavailableError as e:
        if os.environ.get("CI") or os.environ.get("MEDADAPT_REQUIRE_VLLM"):
            pytest.fail(f"CI must run the vLLM tests: {e}")
        pytest.skip(str(e))
    # every core for the engine (vLLM's CPU default keeps one per physical core and reserves one), a small cache
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"))
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    # the engine core in the worker's own process (one vLLM import instead of three: ~19 s less per engine start on
    # CPU, the same tokens); what these tests check is what the engine generates, not vLLM's process layout
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"))


def run(tmp_path, name: str, backend: str, adapter=None) -> tuple[dict, list[dict]]:
    from medadapt.eval.data import BenchmarkDataModule
    from medadapt.module import CausalLMModule

    from ..conftest import connect, tiny_trainer

    module = CausalLMModule(model=ModelConfig(name_or_path=SMOL, compute_dtype="float32", gradient_checkpointing=False),
                            lora=None, init_adapter=adapter, results_dir=str(tmp_path / name))
    data = BenchmarkDataModule(local_dir=str(DATA / "benchmarks"), tasks=["medqa_4options", "pubmedqa"], limit=3,
                               seed=3, batch_size=3, mode="generate",
                               generation={"backend": backend, "temperature": 0.0, "max_new_tokens": 24,
                                           "answer_budget": 8, "enforce_eager": True})
    tiny_trainer(tmp_path).test(module, connect(data, module))
    results = json.loads((tmp_path / name / "results.json").read_text())
    return results, [json.loads(line) for line in open(tmp_path / name / "predictions.jsonl")]


def agree(hf: list[dict], vllm: list[dict]) -> tuple[int, int]:
    same_text = sum(a["replies"][0]["generation"] == b["replies"][0]["generation"] for a, b in zip(hf, vllm))
    same_answer = sum(a["pred"] == b["pred"] for a, b in zip(hf, vllm))
    return same_text, same_answer


@pytest.mark.slow
def test_vllm_serves_an_adapter_through_lora_request_with_the_hf_backends_answers_and_files(tmp_path, monkeypatch):
    """One engine start (~30 s on CPU) checks both: the backend writes what the HF backend writes, and an adapter is
    served as base + ``LoRARequest`` (not merged) with the answers HF gives with it."""
    have_vllm(monkeypatch)
    from medadapt.weights import write_scaled_adapter

    adapter = tmp_path / "adapter"
    cfg = write_scaled_adapter(ModelConfig(name_or_path=SMOL, load_in_4bit=False, compute_dtype="float32",
                                           gradient_checkpointing=False), adapter, rho=0.05,
                               lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    assert served_weights(cfg, str(adapter), "float32")[1]["rank"] == 8  # base + LoRARequest, not a merge
    _, base = run(tmp_path, "base", "hf")
    hf_results, hf = run(tmp_path, "hf", "hf", adapter=str(adapter))
    vl_results, vl = run(tmp_path, "vllm", "vllm", adapter=str(adapter))
    assert agree(base, hf)[0] < 6  # the adapter changes what is generated
    assert [(p["task"], p["id"]) for p in hf] == [(p["task"], p["id"]) for p in vl] and len(vl) == 6
    same_text, same_answer = agree(hf, vl)
    assert same_answer == 6 and same_text >= 5, (same_text, same_answer)
    assert vl_results.keys() == hf_results.keys() and vl_results["tasks"].keys() == hf_results["tasks"].keys()
    assert vl_results["data"]["generation"]["backend"] == "vllm"


def test_4bit_and_stacked_weights_are_served_merged(tiny_qwen, tmp_path, monkeypatch):
    """vLLM applies one LoRA to full-precision weights: a 4-bit base (QLoRA) or stacked base adapters are
    served as one folder merged into the dequantized weights, which computes what the HF backend evaluates."""
    from transformers import AutoModelForCausalLM

    from medadapt.model import load_model
    from medadapt.weights import write_scaled_adapter

    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    nf4 = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=True, compute_dtype="float32", base_adapters=[],
                      gradient_checkpointing=False)
    write_scaled_adapter(nf4, tmp_path / "a", rho=0.02)
    folder, lora = served_weights(nf4, str(tmp_path / "a"), "float32")
    assert lora is None and folder.startswith(str(tmp_path / "cache"))
    assert served_weights(nf4, str(tmp_path / "a"), "float32")[0] == folder  # cached
    x = torch.randint(0, 5000, (1, 12))
    with torch.no_grad():
        evaluated = load_model(nf4, adapter=str(tmp_path / "a"), training=False)(input_ids=x).logits
        served = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=x).logits
    assert_close_to_scale(served, evaluated)
    plain = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, base_adapters=[])
    assert served_weights(plain, None, "float32") == (tiny_qwen, None)


@pytest.mark.slow  # out of the 5-minute fast set; CI runs it
def test_a_fit_checkpoint_is_served_as_the_weights_it_holds(trained, tmp_path, monkeypatch):
    """``test --ckpt_path last.ckpt`` with the vllm backend hands the engine the checkpoint's LoRA (as an adapter,
    merged into the nf4 base here) and nothing else. The engine is replaced by HF generate on exactly what it
    was handed, so the answers must be the HF backend's from the same checkpoint; the vLLM engine itself is
    exercised by the two tests above (SmolLM2: the tiny model's head_dim is below vLLM's CPU minimum)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medadapt.eval import vllm_backend
    from medadapt.eval.generative import collate_generate, generate

    from ..conftest import evaluate

    served = []

    def hf_engine(tokenizer, rows, g, model_dir, lora, dtype, python=None):
        served.append((model_dir, lora))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora is not None:
            model = PeftModel.from_pretrained(model, lora["path"])
        return generate(model.eval(), tokenizer, collate_generate([[r] for r in rows], tokenizer.pad_token_id, g))

    def generations(name: str, *args: str, backend: str = "hf") -> list[str]:
        gen = {"temperature": 0.0, "max_new_tokens": 12, "answer_budget": 4, "backend": backend}
        evaluate(trained, tmp_path / name, "--model.model.load_in_4bit", "true", "--data.mode", "generate",
                 "--data.generation", json.dumps(gen), *args)
        return [json.loads(line)["replies"][0]["generation"] for line in open(tmp_path / name / "predictions.jsonl")]

    monkeypatch.setattr(vllm_backend, "generate", hf_engine)
    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    ckpt = ["--ckpt_path", str(trained["ckpt"])]
    hf, vllm = generations("hf", *ckpt), generations("vllm", *ckpt, backend="vllm")
    assert len(served) == 1 and served[0][0].startswith(str(tmp_path / "cache")) and served[0][1] is None
    assert vllm == hf and len(hf) == 2
    assert generations("base") != hf  # what was served holds the checkpoint's LoRA, not the bare base


@pytest.mark.slow
def test_sampled_generation_on_cpu_survives_prompts_that_outgrow_one_step(monkeypatch):
    """DeepSeek's protocol (temperature 0.6, a seed per prompt) on 20 MedQA prompts (6k prompt tokens, more than one
    engine step holds): vLLM's chunked prefill rewound the seeded generators with an offset CPU generators lack
    ("CPU Generator does not use offset"). The worker prefills whole prompts on CPU; every prompt gets a reply."""
    from medadapt.eval import vllm_backend
    from medadapt.eval.generative import GenerationConfig, gen_row
    from medadapt.eval.tasks import load_task, select
    from medadapt.model_config import load_tokenizer

    have_vllm(monkeypatch)
    cfg = ModelConfig(name_or_path=SMOL, compute_dtype="float32", load_in_4bit=False, base_adapters=[])
    tok = load_tokenizer(cfg)
    g = GenerationConfig(temperature=0.6, max_new_tokens=4, answer_budget=0, open_think=False, enforce_eager=True)
    rows = [gen_row(tok, it, g) for it in select(load_task("medqa_4options", str(DATA / "benchmarks"), False), 20, 1)]
    assert sum(len(r.input_ids) for r in rows) > 4096
    replies = vllm_backend.generate(tok, rows, g, *vllm_backend.served_weights(cfg, None, "float32"), "float32")
    assert len(replies) == 20 and all(r[0].tokens > 0 for r in replies)


def test_a_worker_failure_names_its_root_cause_and_keeps_the_whole_output(tmp_path, monkeypatch):
    from medadapt.eval.vllm_backend import worker_failure

    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path))
    stderr = ("Loading weights\n" * 500 + "Traceback (most recent call last):\n  File x\n"
              "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n" + "  frame\n" * 300 +
              "RuntimeError: Worker failed with error 'CPU Generator does not use offset'\n")
    message = worker_failure(1, stderr)
    assert message.index("CPU Generator does not use offset") < message.index("EngineDeadError")
    log = message.rsplit("Full output: ", 1)[1]
    assert open(log).read() == stderr
