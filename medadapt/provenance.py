"""What an adapter or checkpoint was trained on, recorded and checked.

Every exported adapter carries ``medadapt_adapter.json`` (its base model's content identity, quantization, the
base adapters stacked under it, the recipe) and every checkpoint the same ``base`` record. Loading compares the
weights about to be used with that record by content, not by name, and settles a config's open (null) choices from
it, so an adapter is never scored on weights it was not trained on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from medadapt.files import cache_dir
from medadapt.model_config import PACKAGED_MODELS, LoraConfig, ModelConfig, resolve_model_path

log = logging.getLogger(__name__)

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
