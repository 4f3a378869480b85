"""Effective weights read off a model's own layers: how much of an update a composed model really holds.

A 4-bit base, stacked adapters, merged and re-quantized folders all compute ``y = W x + b`` per projection
in the end; reading ``W`` from each layer's forward pass (``W = (f(I) - f(0))ᵀ``) measures what the model
computes, not what a config says it should. Used by the CPT→SFT tests and ``benchmarks/cpt_kept_share.py``.
"""

from __future__ import annotations

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def projection_weights(model) -> dict[str, torch.Tensor]:
    """``layers.N.…_proj`` → its effective (out, in) weight in float32. Call in eval mode (no dropout)."""
    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in PROJECTIONS and hasattr(module, "in_features") and "layers." in name:
            param = next(module.parameters())
            dtype = param.dtype if param.dtype.is_floating_point else torch.float32
            eye = torch.eye(module.in_features, dtype=dtype, device=param.device)
            out[name[name.index("layers."):]] = (module(eye) - module(eye[:1] * 0)).T.float().cpu()
    return out


def kept_share(trained: dict, start: dict, wanted: dict) -> float:
    """Share of the update ``wanted − start`` present in ``trained − start``: the projection
    ⟨trained − start, wanted − start⟩ / ‖wanted − start‖², summed over all layers."""
    num = sum(float(((trained[k] - start[k]) * (wanted[k] - start[k])).sum()) for k in start)
    den = sum(float(((wanted[k] - start[k]) ** 2).sum()) for k in start)
    return num / den


def relative_size(update: dict, start: dict) -> float:
    """‖update − start‖ / ‖start‖ over all layers (ρ in the CPT→SFT measurements)."""
    num = sum(float(((update[k] - start[k]) ** 2).sum()) for k in start)
    return (num / sum(float((start[k] ** 2).sum()) for k in start)) ** 0.5


def write_scaled_adapter(model_cfg, path, rho: float, seed: int = 0, lora=None):
    """Save a LoRA adapter whose update is ``rho`` of each projection's weight in norm, as a fit run saves
    one (PEFT files + medadapt metadata): a controlled stand-in for a trained CPT adapter. Returns the
    resolved model config it was made on."""
    from medadapt.model import load_model, save_adapter
    from medadapt.model_config import LoraConfig
    from medadapt.provenance import resolve_model_config, write_adapter_metadata

    cfg = resolve_model_config(model_cfg, None, "", training=True)
    lora = lora or LoraConfig(r=8, alpha=16, dropout=0.0)
    model = load_model(cfg, lora, training=False)
    before = projection_weights(model)
    torch.manual_seed(seed)
    layers = {name[name.index("layers."):]: m for name, m in model.named_modules()
              if "layers." in name and hasattr(m, "lora_B") and "default" in m.lora_B}
    for m in layers.values():
        m.lora_B["default"].weight.data.normal_()
    after = projection_weights(model)
    for key, m in layers.items():
        m.lora_B["default"].weight.data *= rho * before[key].norm() / (after[key] - before[key]).norm()
    save_adapter(model, path)
    write_adapter_metadata(str(path), cfg, lora)
    return cfg
