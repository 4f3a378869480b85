"""The one model loader every method uses: base weights → optional 4-bit → optional LoRA.

Which model and how (``ModelConfig``, ``LoraConfig``, names resolved to files) is ``model_config.py``; what an
adapter was trained on and the checks that it is loaded on those weights is ``provenance.py``. Here: the base built
for training or inference (frozen weights in the compute dtype, checkpointing, Liger), adapters attached and
stacked, decoder layers compiled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch

from medadapt.attention import resolve_attention
from medadapt.model_config import LoraConfig, ModelConfig, from_pretrained, resolve_dtype
from medadapt.provenance import AdapterMismatchError, check_base_adapter, read_adapter_metadata, resolve_model_config

log = logging.getLogger(__name__)


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


def load_base(cfg: ModelConfig, *, training: bool):
    """The base weights alone (4-bit if configured), prepared for training when ``training``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg.load_in_4bit is None:
        cfg = resolve_model_config(cfg, None, "", training=training)
    dtype = resolve_dtype(cfg.compute_dtype)
    kwargs = dict(
        revision=cfg.revision,
        dtype=dtype,
        attn_implementation=resolve_attention(cfg.attn_implementation, training=training),
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
    model = from_pretrained(AutoModelForCausalLM, cfg.name_or_path, **kwargs)
    if cfg.load_in_4bit:
        disable_bnb_cpu_repacking(model)
    if training:
        model.config.use_cache = False
        checkpointing = cfg.gradient_checkpointing is not False  # auto: on until the first step decides
        ckpt_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks DDP + LoRA
        if cfg.load_in_4bit and cfg.frozen_dtype == "float32":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs=ckpt_kwargs,
            )
        elif cfg.load_in_4bit:  # PEFT's preparation without its fp32 upcast of the frozen weights
            for p in model.parameters():
                p.requires_grad_(False)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
                model.enable_input_require_grads()
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            model.enable_input_require_grads()
        apply_liger(model, cfg.liger)
    return model


def apply_liger(model, setting: Union[bool, str]) -> bool:
    """Liger-Kernel's RoPE, RMSNorm and SwiGLU on a model about to be trained (before PEFT wraps it): ``auto`` where
    liger_kernel imports on CUDA. Its fused linear cross-entropy stays off: medadapt's loss never calls the
    model's own head (``loss.py``). Returns whether it was applied."""
    available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if setting is False or (setting == "auto" and not available):
        return False
    if not available:
        raise ValueError("model.liger: true needs the liger-kernel package and a CUDA device (pip install liger-kernel); "
                         "set model.liger: auto to use it only where it runs")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("Liger kernels applied (RoPE, RMSNorm, SwiGLU)")
    return True


def unwrapped(model):
    """The transformers model inside a PEFT wrapper (its LoRA layers stay in place and active), so that its decoder
    and output head can be called apart: the loss and the scorer run the head on the positions they need only."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_adapter(model, adapter_dir: str, name: str, *, trainable: bool):
    """Load a saved PEFT adapter into ``model`` under ``name``; every tensor of the file must find its layer
    and every layer its tensor (peft only warns, and a half-applied adapter scores like a broken model)."""
    from peft import PeftConfig, PeftModel

    from medadapt.files import check_safetensors

    read_adapter_metadata(adapter_dir)  # a clear error when the folder holds no adapter, or unreadable records
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.exists():
        check_safetensors(weights, "adapter weights")  # a cut file names itself here, not deep inside peft
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = not trainable
    try:
        if not isinstance(model, PeftModel):
            model = PeftModel(model, config, adapter_name=name)
        result = model.load_adapter(adapter_dir, adapter_name=name, is_trainable=trainable)
    except (RuntimeError, ValueError) as e:  # shape mismatches, target modules the model lacks
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit this base model: {e}") from e
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit this base model: {len(result.missing_keys)} "
                                   f"layer(s) without a tensor, {len(result.unexpected_keys)} tensor(s) without a "
                                   f"layer, e.g. {bad[:3]}")
    return model


def load_model(cfg: ModelConfig, lora: Optional[LoraConfig] = None, *, adapter: Optional[str] = None,
               training: bool = True):
    """Base weights → optional 4-bit → the adapter being trained or evaluated (a fresh ``lora`` or a saved
    ``adapter``, named ``default``) → ``cfg.base_adapters`` stacked under it, frozen.

    Stacking instead of merging keeps a previous stage's update exact on a 4-bit base: merged and
    re-quantized, ``nf4(dequant(nf4(W)) + ΔW)`` snaps back to the old grid and keeps ~1% of a typical
    CPT update (README, "CPT→SFT"). The fresh LoRA is created before the base adapters are loaded, so it
    draws the same initial weights as it would on the plain base.
    """
    if lora is not None and adapter is not None:
        raise ValueError("give a fresh lora or a saved adapter, not both")
    if cfg.load_in_4bit is None or cfg.base_adapters is None:
        cfg = resolve_model_config(cfg, None, "", training=training)
    model = load_base(cfg, training=training)
    if lora is not None:
        model = attach_lora(model, lora)
    elif adapter is not None:
        model = add_adapter(model, adapter, "default", trainable=training)
    names = ["default"] if lora is not None or adapter is not None else []
    for i, path in enumerate(cfg.base_adapters):
        check_base_adapter(path, cfg, cfg.base_adapters[:i])
        model = add_adapter(model, path, f"base{i}", trainable=False)
        names.append(f"base{i}")
    if len(names) > 1:
        model.base_model.set_adapter(names)  # all active (their outputs add up); peft marks all trainable
        for name, p in model.named_parameters():
            if any(f".{n}." in name for n in names[1:]) or not training:
                p.requires_grad_(False)
    if training and names and (lora is None or lora.fused):
        from medadapt.lora import fuse_lora

        fuse_lora(model)
    if training and compile_wanted(cfg.compile):
        compile_layers(model)
    model.train(training)
    return model


def compile_wanted(setting: Union[bool, str]) -> bool:
    """``model.compile``: ``auto`` compiles on CUDA only (on a CPU compiling costs more than a test run trains)."""
    if setting == "auto":
        if not torch.cuda.is_available():
            log.info("model.compile: auto is off on CPU (compilation takes longer than CPU runs train)")
        return torch.cuda.is_available()
    return bool(setting)


#: dynamo's recompile limit once medadapt compiles layers (its default is 8): see ``compile_layers``
RECOMPILE_LIMIT = 32


def compile_layers(model) -> int:
    """Regional compilation: each decoder layer's forward compiled in place (``nn.Module.compile``), so one graph
    serves all of them (every layer has the same shapes) and the LoRA layers, the 4-bit matmuls and the attention
    kernel are compiled where they run. Compilation happens at the first call.

    Every layer runs one code object, whose compilations dynamo counts together: the first layer's input needs no
    gradient where the others' do (unless checkpointing made it), each batch dimension that varies (tokens, segments)
    recompiles once to a dynamic graph, validation runs without gradients or dropout, and the compile probe runs other
    shapes: 7 graphs in the first steps of a CPU rehearsal without checkpointing (``tests/test_compile.py``), one
    short of dynamo's default limit, past which it runs the layers eager for good. The limit is raised to
    ``RECOMPILE_LIMIT`` (never lowered)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    layers = unwrapped(model).get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


def uncompile_layers(model) -> None:
    """Back to eager decoder layers (``model.compile: auto`` when compiling failed)."""
    for layer in unwrapped(model).get_decoder().layers:
        layer._compiled_call_impl = None


def is_compiled(model) -> bool:
    return any(getattr(layer, "_compiled_call_impl", None) is not None
               for layer in unwrapped(model).get_decoder().layers)


def save_adapter(model, path: Union[str, Path], adapter: str = "default") -> None:
    """One adapter of ``model`` as a PEFT folder (safetensors), written the same way every time: PEFT writes a set
    (``target_modules``) as a list in the process's hash order, so two saves of one adapter differed in bytes, and
    every content digest of it with them."""
    for config in getattr(model, "peft_config", {}).values():
        for key, value in vars(config).items():
            if isinstance(value, set):
                setattr(config, key, sorted(value))
    model.save_pretrained(str(path), safe_serialization=True, selected_adapters=[adapter])


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
