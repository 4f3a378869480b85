"""AdamW with linear warmup then cosine decay: the settings, and the choices that depend on the run.

Warmup can be a share of the run (``warmup_ratio``), which survives packing; fused AdamW is used only where
the device has it and the precision allows clipping with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay.

    Args:
        lr: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Optimizer steps of linear warmup from 0 to ``lr``.
        warmup_ratio: Warmup as a fraction of all optimizer steps; replaces ``warmup_steps`` when set.
            Packing changes the number of optimizer steps (more examples per step), so a ratio keeps a
            recipe's warmup share where a step count would not.
        min_lr_ratio: Floor of the cosine as a fraction of ``lr``.
        fused: Use the fused AdamW kernel where the device supports it (CUDA) and the precision allows
            it: fused AdamW unscales fp16 gradients itself, so with ``16-mixed`` and gradient clipping
            (which needs unscaled gradients first) the foreach kernel is used instead.
        embedding_lr: Separate learning rate for fully trained embeddings / LM head (listed in
            ``lora.modules_to_save``); null uses ``lr``. Continual pretraining typically uses lr/10.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 300
    warmup_ratio: Optional[float] = None
    min_lr_ratio: float = 0.0
    fused: bool = True
    embedding_lr: Optional[float] = None


#: devices whose AdamW has a fused kernel medadapt uses
FUSED_DEVICES = ("cuda",)


def use_fused(requested: bool, params: list, trainer, clipping: Optional[float] = None) -> bool:
    """Fused AdamW where the device has it, unless an fp16 grad scaler and clipping (``clipping``: the norm the run
    clips to) are both on: fused AdamW unscales inside its step, so the gradients to clip would still be scaled
    (Lightning refuses)."""
    if not requested or not params or not all(p.device.type in FUSED_DEVICES for p in params):
        return False
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and clipping:
        log.info("fused AdamW is off: 16-mixed precision with gradient clipping needs unscaled gradients")
        return False
    return True


def resolve_warmup(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_ratio is None:
        return cfg.warmup_steps
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    return math.ceil(cfg.warmup_ratio * total_steps)  # as transformers' TrainingArguments.warmup_ratio


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:  # (warmup 0: full learning rate from the first step)
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
