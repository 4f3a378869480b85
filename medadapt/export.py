"""``python -m medadapt export``: merge a LoRA adapter into its base → a standalone HF model folder.

QLoRA adapters were trained against the *nf4-quantized* base weights. Merging the adapter into the
4-bit layers in place (peft's ``merge_and_unload`` on a bnb model) rounds the sum back to 4 bits, which
throws most of a small LoRA update away: the known quality trap. Here the base is loaded exactly as it
was trained (same nf4 settings), dequantized to full precision (transformers' ``dequantize()``), and the
adapter is added to those dense weights. The result is what the trained model computed, in plain
safetensors that any ``transformers`` (or vLLM, TGI, llama.cpp converter) loads without bitsandbytes.
For the next stage of the multi-step method it is simply re-quantized on load.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from medadapt.model import ModelConfig, load_model, load_tokenizer, resolve_dtype

log = logging.getLogger(__name__)


def merged_model(base: ModelConfig, adapter_dir: str, dtype: str = "float32"):
    """The base with the adapter merged, unquantized, in ``dtype``.

    ``base.load_in_4bit`` says how the adapter was trained: true (QLoRA) merges into the dequantized
    nf4 weights it was trained against; false merges into the base weights as stored.
    """
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"no PEFT adapter at {adapter_dir} (adapter_config.json missing); a fit run "
                                "exports one to <checkpoint dir>/adapter (model.adapter_dir)")
    target = resolve_dtype(dtype)
    cfg = replace(base, compute_dtype=dtype, gradient_checkpointing=False)
    model = load_model(cfg, None, training=False)
    if base.load_in_4bit:
        model = model.dequantize()
        # norms and embeddings come from the checkpoint in their own dtype: one dtype for the export
        model = model.to(target)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.eval()
    return merged


def export(base: ModelConfig, adapter_dir: Optional[str], out_dir: str, dtype: str = "bfloat16") -> Path:
    """Write ``out_dir``: model safetensors, tokenizer, and ``medadapt_export.json`` (what it was made from)."""
    out = Path(out_dir)
    if adapter_dir is None:
        model = load_model(replace(base, load_in_4bit=False, compute_dtype=dtype), None, training=False)
    else:
        model = merged_model(base, adapter_dir, dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base).save_pretrained(out)
    (out / "medadapt_export.json").write_text(json.dumps(
        {"base": asdict(base), "adapter": adapter_dir, "dtype": dtype}, indent=2))
    log.info("exported %s + %s → %s", base.name_or_path, adapter_dir, out)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m medadapt export", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="base model: hub id, local folder or packaged name")
    ap.add_argument("--adapter", help="PEFT adapter folder (e.g. checkpoints/sft/adapter); omit to export the base")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--trained_in_4bit", default="true", choices=["true", "false"],
                    help="whether the adapter was trained on the nf4 base (QLoRA, the default) or unquantized")
    ap.add_argument("--quant_type", default="nf4", help="4-bit type used in training (nf4 | fp4)")
    ap.add_argument("--double_quant", default="true", choices=["true", "false"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the written weights")
    ap.add_argument("--trust_remote_code", action="store_true")
    args = ap.parse_args(argv)
    base = ModelConfig(name_or_path=args.base, load_in_4bit=args.trained_in_4bit == "true", quant_type=args.quant_type,
                       double_quant=args.double_quant == "true", trust_remote_code=args.trust_remote_code)
    out = export(base, args.adapter, args.out, args.dtype)
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")

