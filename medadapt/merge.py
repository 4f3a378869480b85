"""Merging adapters into their base → a standalone HF model folder (``python -m medadapt export``, vLLM serving).

QLoRA adapters were trained against the *nf4-quantized* base weights. Merging the adapter into the
4-bit layers in place (peft's ``merge_and_unload`` on a bnb model) rounds the sum back to 4 bits, which
throws most of a small LoRA update away: the known quality trap. Here the base is loaded exactly as it
was trained (same nf4 settings), dequantized to full precision (transformers' ``dequantize()``), and the
adapter is added to those dense weights. The result is what the trained model computed, in plain
safetensors that any ``transformers`` (or vLLM, TGI, llama.cpp converter) loads without bitsandbytes.
An adapter trained on top of base adapters (the SFT stage of CPT→SFT) is merged after them, in order.

The merged folder is for serving, not for training on in 4-bit: re-quantizing it snaps the merged
weights back to the nf4 grid and erases most of a small update (why CPT→SFT stacks adapters instead).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from medadapt.files import write_json
from medadapt.model import add_adapter, load_base
from medadapt.model_config import ModelConfig, load_tokenizer, resolve_dtype
from medadapt.provenance import check_base_adapter, read_adapter_metadata, resolve_model_config

log = logging.getLogger(__name__)


def merged_model(base: ModelConfig, adapter_dir: Optional[str], dtype: str = "float32"):
    """The base with ``base.base_adapters`` and then the adapter merged, unquantized, in ``dtype``.

    Open choices of ``base`` (null ``load_in_4bit`` / ``base_adapters``) are settled from the adapter's
    metadata, as the test stage settles them, so the export is the model that was evaluated. A 4-bit
    (QLoRA) base is merged into the dequantized nf4 weights it was trained against; an unquantized one
    into the base weights as stored.
    """
    meta = read_adapter_metadata(adapter_dir) if adapter_dir else {"base": None, "foreign": False}
    cfg = resolve_model_config(base, meta["base"], f"adapter {adapter_dir}", training=False, foreign=meta["foreign"])
    target = resolve_dtype(dtype)
    model = load_base(replace(cfg, compute_dtype=dtype, gradient_checkpointing=False), training=False)
    if cfg.load_in_4bit:
        model = model.dequantize()
        # norms and embeddings come from the checkpoint in their own dtype: one dtype for the export
        model = model.to(target)
    for i, path in enumerate([*cfg.base_adapters, *([adapter_dir] if adapter_dir else [])]):
        if i < len(cfg.base_adapters):
            check_base_adapter(path, cfg, cfg.base_adapters[:i])
        model = add_adapter(model, path, "default", trainable=False).merge_and_unload()
    model.config.use_cache = True
    model.eval()
    return model, cfg


def check_out_dir(out: Path, base: ModelConfig, adapters: list[str], overwrite: bool) -> None:
    """``out`` must not be a folder being read (the base model, an adapter being merged): writing there destroys
    it, or leaves a folder that loads as something else; nor an empty path, the working directory, the home folder or
    the root (``--out "$UNSET" --overwrite true`` would clear them), nor a link. Any other non-empty folder needs
    ``overwrite``; it is replaced only once the new export is whole (``export``), so a failing export leaves it as
    it was."""
    from medadapt.files import check_output_path
    from medadapt.model_config import PACKAGED_MODELS, resolve_model_path

    check_output_path(out, "--out")
    target = out.resolve()
    reading = [Path(p).resolve() for p in adapters]
    if base.name_or_path.lower() in PACKAGED_MODELS or Path(base.name_or_path).expanduser().exists():
        reading.append(Path(resolve_model_path(base.name_or_path)).resolve())
    for folder in reading:
        if target == folder or folder in target.parents or target in folder.parents:
            raise FileExistsError(f"--out {out} is (or holds, or is inside) {folder}, which this export reads: write the "
                                  "merged model to a folder of its own")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty ({', '.join(sorted(p.name for p in out.iterdir())[:4])}"
                              "…): choose an empty folder, or --overwrite true to replace its content")


def export(base: ModelConfig, adapter_dir: Optional[str], out_dir: str, dtype: str = "bfloat16",
           overwrite: bool = False) -> Path:
    """Write ``out_dir``: model safetensors, tokenizer, and ``medadapt_export.json`` (what it was made from). The
    export is written to a fresh folder beside ``out_dir`` and put in its place only when whole: an existing folder
    (``overwrite``) is replaced after every input was read and the new one written, never cleared first."""
    import shutil
    import tempfile

    from medadapt.files import umask_mode

    out = Path(out_dir)
    stack = list(base.base_adapters or [])
    if adapter_dir and base.base_adapters is None:  # the adapters it was trained on, from its metadata
        stack = list((read_adapter_metadata(adapter_dir).get("base") or {}).get("base_adapters") or [])
    check_out_dir(out, base, [*stack, *([adapter_dir] if adapter_dir else [])], overwrite)
    if adapter_dir is None and not base.base_adapters:
        cfg = replace(base, load_in_4bit=False, compute_dtype=dtype, base_adapters=[])
        model = load_base(cfg, training=False)
    else:
        model, cfg = merged_model(base, adapter_dir, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        model.save_pretrained(fresh, safe_serialization=True)
        load_tokenizer(base).save_pretrained(fresh)
        write_json(fresh / "medadapt_export.json", {"base": asdict(cfg), "adapter": adapter_dir, "dtype": dtype},
                   indent=2)
        os.chmod(fresh, umask_mode(0o777))
        if out.exists():
            if any(out.iterdir()):
                log.warning("--overwrite: replacing %s with the new export", out)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            out.rename(old / "previous")
            fresh.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            fresh.rename(out)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    log.info("exported %s + %s → %s", base.name_or_path, [*cfg.base_adapters, adapter_dir], out)
    return out
