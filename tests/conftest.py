"""Shared fixtures: tiny random models built from configs with the real R1-distill tokenizer. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDADAPT_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
R1_TOKENIZER = SHARED / "fixtures" / "deepseek-r1-distill-qwen-tokenizer"
SFT_SAMPLE = DATA / "sft" / "medical_o1_reasoning_sample.json"


def build_tiny_model(path: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """Save a 2-layer random model with the real R1 tokenizer as a plain HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(R1_TOKENIZER)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
    from medadapt.model import LoraConfig, ModelConfig
    from medadapt.module import CausalLMModule, OptimConfig

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


def tiny_trainer(root, **kw):
    import lightning as L

    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=str(root), enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)
