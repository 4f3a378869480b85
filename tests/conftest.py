"""Shared fixtures: tiny random models built from configs with the real R1-distill tokenizer. No network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from medadapt.model_config import LoraConfig, ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def share_the_cores() -> None:
    """Under pytest-xdist (``scripts/test.sh`` runs 2 workers) each worker computes with its share of the cores, and
    so do the processes its tests start (fits, DDP ranks, CLI runs): two workers each running torch on every core
    would oversubscribe them. An explicit ``OMP_NUM_THREADS`` is kept. Much of the suite is single-threaded (imports,
    tokenizing, subprocess start-up), so two workers at one thread each, slow tests first, finish the 2-core suite
    ~1.8× sooner than one at two threads (12:03 vs 21:59 on a 2-core EPYC); ``scripts/test.sh -n 0`` runs it
    serially at every core (numerics at 2 threads)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // workers)))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


share_the_cores()


def pytest_collection_modifyitems(config, items) -> None:
    """Slow tests (minutes each: the study, the GPU check, vLLM, DDP) first, so that xdist hands them out while
    the short ones are left to fill in behind them, not last, where one long test would run alone. Every worker
    sorts the same collection the same way (xdist requires it); a serial run is unaffected."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept within each

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDADAPT_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
R1_TOKENIZER = SHARED / "fixtures" / "deepseek-r1-distill-qwen-tokenizer"
SFT_SAMPLE = DATA / "sft" / "medical_o1_reasoning_sample.json"


def build_tiny_model(path: Path, arch: str = "qwen2", seed: int = 0, layers: int = 2) -> Path:
    """Save a small random model (2 layers by default) with the real R1 tokenizer as a plain HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(R1_TOKENIZER)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama"))


@pytest.fixture(scope="session")
def r1_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(R1_TOKENIZER)


@pytest.fixture(scope="session")
def short_sft_file(tmp_path_factory) -> str:
    """Real SFT rows with each text field cut short, so tiny-model training steps take a second."""
    import json

    rows = json.load(open(SFT_SAMPLE))[:32]
    short = [{"Question": r["Question"][: 60 + 7 * i], "Complex_CoT": r["Complex_CoT"][: 40 + 13 * i],
              "Response": r["Response"][: 30 + 5 * i]} for i, r in enumerate(rows)]
    path = tmp_path_factory.mktemp("sft") / "short.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in short))
    return str(path)


def tiny_module(model_path: str, *, load_in_4bit: bool = False, dropout: float = 0.0, lr: float = 1e-3,
                cls=None, **optim):
    from medadapt.model_config import LoraConfig, ModelConfig
    from medadapt.module import CausalLMModule
    from medadapt.optim import OptimConfig

    return (cls or CausalLMModule)(
        model=ModelConfig(name_or_path=model_path, load_in_4bit=load_in_4bit, compute_dtype="float32",
                          gradient_checkpointing=True),
        lora=LoraConfig(r=8, alpha=16, dropout=dropout),
        optim=OptimConfig(**{"lr": lr, "warmup_steps": 0, "fused": False, **optim}),
    )


def tiny_data(data_file: str, **kw):
    from medadapt.data.reasoning import ReasoningSFTDataModule

    kw.setdefault("max_length", 256)
    kw.setdefault("val_fraction", 0.125)
    return ReasoningSFTDataModule(data_files=data_file, **kw)


def connect(data, module):
    """What the CLI does before a run: hand the model's tokenizer to the data module."""
    data.connect(module.tokenizer)
    return data


def tiny_trainer(root, **kw):
    import lightning as L

    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=str(root), enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="session")
def trained(tiny_qwen, short_sft_file, tmp_path_factory):
    """One 4-bit fit through the CLI: its checkpoint folder (last.ckpt) and exported adapter."""
    import json

    from medadapt.cli import main as cli

    root = tmp_path_factory.mktemp("fit")
    cli(["fit", "--model.model.name_or_path", tiny_qwen, "--model.model.load_in_4bit", "true",
         "--model.model.compute_dtype", "float32", "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
         "--model.optim.lr", "0.05", "--model.optim.warmup_steps", "0", "--model.optim.fused", "false",
         "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", short_sft_file,
         "--data.max_length", "256", "--data.val_fraction", "0", "--data.batch_size", "2",
         "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
         "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                             "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}])])
    return {"adapter": root / "ckpt" / "adapter", "ckpt": root / "ckpt" / "last.ckpt", "base": tiny_qwen}


def sft_stage(base: str, data_file: str, max_steps: int) -> dict:
    """A multistep stage config: unquantized tiny SFT on ``data_file``, no logger, no progress bar."""
    return {"model": {"model": {"name_or_path": base, "load_in_4bit": False, "compute_dtype": "float32"},
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "optim": {"fused": False}},
            "data": {"class_path": "medadapt.data.reasoning.ReasoningSFTDataModule",
                     "init_args": {"data_files": data_file, "max_length": 256, "val_fraction": 0}},
            "trainer": {"accelerator": "cpu", "max_steps": max_steps, "logger": False, "enable_progress_bar": False}}


def evaluate(trained, out, *extra) -> dict:
    """``python -m medadapt test`` (in-process) of ``trained["base"]`` on two PubMedQA items; its results.json."""
    import json

    from medadapt.cli import main as cli

    cli(["test", "--model.model.name_or_path", trained["base"], "--model.model.compute_dtype", "float32",
         "--model.model.gradient_checkpointing", "false", "--model.lora", "null", "--model.results_dir", str(out),
         "--data", "medadapt.eval.data.BenchmarkDataModule", "--data.local_dir", str(DATA / "benchmarks"),
         "--data.tasks", '["pubmedqa"]', "--data.limit", "2", "--trainer.accelerator", "cpu",
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *extra])
    return json.loads((out / "results.json").read_text())


def run_test_stage(model_path, tmp_path, **data_kw):
    """The test stage of an unquantized model on the shared benchmark files; results in tmp_path/results."""
    from medadapt.eval.data import BenchmarkDataModule
    from medadapt.model_config import ModelConfig
    from medadapt.module import CausalLMModule

    module = CausalLMModule(model=ModelConfig(name_or_path=model_path, load_in_4bit=False, compute_dtype="float32",
                                              gradient_checkpointing=False),
                            lora=None, results_dir=str(tmp_path / "results"))
    data = BenchmarkDataModule(local_dir=str(DATA / "benchmarks"), **data_kw)
    tiny_trainer(tmp_path).test(module, connect(data, module))
    return module, data


def random_examples(n: int, seed: int = 0, vocab: int = 1000):
    """``n`` token examples of 5 to 40 random ids, each with a prompt part the loss ignores."""
    import random

    from medadapt.data.packing import IGNORE_INDEX

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 40)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def assert_close_to_scale(got, expected, rtol: float = 1e-5, msg: str = "") -> None:
    """``got`` equals ``expected`` up to ``rtol`` of the magnitude compared (the largest |expected|), elementwise.

    A different summation order (merged vs unmerged weights, chunked vs full, packed vs alone, another CPU's
    kernels) moves float32 results by a few ulps of the largest values involved, so the absolute tolerance
    scales with them: a fixed atol fitted to one machine's rounding fails on the next. fp32 ulp ≈ 1.2e-7; 1e-5
    leaves room for the ~100 ulps a deep sum can move while still catching a real difference.
    """
    import torch

    got, expected = torch.as_tensor(got), torch.as_tensor(expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=msg or None)


def assert_gradients_close(got: dict, expected: dict, rtol: float = 1e-5, msg: str = "") -> None:
    """Two gradients (name → tensor), compared as the one vector they are: within ``rtol`` of its largest entry. Per
    tensor, a small tensor whose entries are sums of cancelling terms would be held to a scale its summands never
    had (its own largest entry), and fail on rounding alone."""
    import torch

    names = sorted(expected)
    assert sorted(got) == names, msg
    flat = torch.cat([expected[n].flatten().float() for n in names])
    assert torch.count_nonzero(flat) > 0, f"{msg}: the expected gradient is zero, nothing is compared"
    assert_close_to_scale(torch.cat([got[n].flatten().float() for n in names]), flat, rtol=rtol, msg=msg)


def built_module(model: "ModelConfig", lora: "LoraConfig", std: float = 0.02):
    """A CausalLMModule built for training whose LoRA B is not zero (seeded per tensor name, so two builds of one
    model get the same adapter): gradients reach A and B, and the LoRA path is part of what is compared."""
    import torch

    from medadapt.module import CausalLMModule

    module = CausalLMModule(model=model, lora=lora)
    torch.manual_seed(0)
    module.build_model(training=True)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * std)
    return module
