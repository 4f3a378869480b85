"""What a fit checkpoint was trained on, read without running its pickle, and checked against a config.

Checkpoints hold only the trainable (LoRA) tensors plus a ``medadapt`` record of the base (model, quantization,
base adapters) and the LoRA shape, so a later run can rebuild exactly the model they belong to, and refuse a
config that would load them into another.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from medadapt.model_config import LoraConfig
from medadapt.provenance import AdapterMismatchError, TRAINED_ON


def checkpoint_record(ckpt_path: str) -> dict:
    """What a fit checkpoint was trained on (``base``: TRAINED_ON fields; ``lora``), read without running a
    pickle (weights_only). Checkpoints of older runs have only their config hparams."""
    return record_of(load_checkpoint(ckpt_path))


def load_checkpoint(ckpt_path: str, mmap: bool = True) -> dict:
    """``torch.load(weights_only=True)`` of a local checkpoint; a cut or foreign file is an error naming it."""
    from medadapt.files import UnreadableFileError

    path = checked_local(ckpt_path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch names neither the file nor what to do
        raise UnreadableFileError(f"checkpoint {path}: not a readable checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); was it cut short while being written?") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableFileError(f"checkpoint {path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def checked_local(ckpt_path: str) -> str:
    """A checkpoint path that is a local file; URLs are refused (Lightning unpickles remote checkpoints with
    weights_only=False: a checkpoint URL could run code)."""
    if "://" in str(ckpt_path):
        raise ValueError(f"ckpt_path {ckpt_path!r} is a URL: download it and pass the local file (a remote "
                         "checkpoint would be unpickled with weights_only=False)")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    return str(ckpt_path)


def record_of(checkpoint: dict) -> dict:
    if "medadapt" in checkpoint:
        return checkpoint["medadapt"]
    hparams = checkpoint.get("hyper_parameters", {})
    base = {k: v for k, v in (hparams.get("model") or {}).items() if k in TRAINED_ON and v is not None}
    return {"base": base or None, "lora": hparams.get("lora")}


def checked_lora(configured: Optional[LoraConfig], saved: Optional[dict], source: str) -> Optional[LoraConfig]:
    """The LoRA shape a checkpoint was trained with; a configured one that differs is an error."""
    if saved is None:
        if configured is not None:
            raise AdapterMismatchError(f"{source} holds no LoRA adapter, but the config asks for one")
        return None
    trained = LoraConfig(**saved)
    if configured is not None:
        shape = ("r", "alpha", "target_modules", "modules_to_save")
        diff = {k: (getattr(configured, k), getattr(trained, k)) for k in shape
                if getattr(configured, k) != getattr(trained, k)}
        if diff:
            raise AdapterMismatchError(f"{source} was trained with a different LoRA: "
                                       + ", ".join(f"{k}={t!r} (config: {c!r})" for k, (c, t) in diff.items())
                                       + "; set model.lora to null to take the checkpoint's")
        return replace(trained, dropout=configured.dropout)
    return trained
