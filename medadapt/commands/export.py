"""Merge an adapter (and the base adapters it was trained on) into its base → a standalone HF model folder.

    python -m medadapt export --base deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter checkpoints/sft/adapter \\
        --out exported/sft

A QLoRA adapter is merged into the dequantized nf4 weights it was trained against (``medadapt/merge.py``);
how it was trained is read from its ``medadapt_adapter.json`` unless ``--trained_in_4bit`` says otherwise.
"""

from __future__ import annotations

from typing import Literal, Optional

from medadapt.console import command_parser


def build_parser():
    p = command_parser("export", __doc__)
    p.add_argument("--base", type=str, required=True, help="base model: hub id, local folder or packaged name")
    p.add_argument("--adapter", type=Optional[str], default=None,
                   help="PEFT adapter folder (e.g. checkpoints/sft/adapter); null exports the base")
    p.add_argument("--out", type=str, required=True, help="output folder")
    p.add_argument("--trained_in_4bit", type=Optional[bool], default=None,
                   help="whether the adapter was trained on the nf4 base (QLoRA); null: as its medadapt_adapter.json "
                        "records")
    p.add_argument("--quant_type", type=Literal["nf4", "fp4"], default="nf4", help="4-bit type used in training")
    p.add_argument("--double_quant", type=bool, default=True, help="double quantization used in training")
    p.add_argument("--dtype", type=Literal["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the written weights")
    p.add_argument("--trust_remote_code", type=bool, default=False, help="run modelling code shipped with the base")
    p.add_argument("--overwrite", type=bool, default=False,
                   help="--out may hold files: they are removed first (never the base or adapter folders being read)")
    return p


def main(argv: list[str]) -> None:
    from medadapt.merge import export
    from medadapt.model_config import ModelConfig
    from medadapt.provenance import read_adapter_metadata

    args = build_parser().parse_args(argv)
    foreign = bool(args.adapter) and read_adapter_metadata(args.adapter)["foreign"]
    if args.trained_in_4bit is None and foreign:
        raise SystemExit(f"{args.adapter} does not record how it was trained (no medadapt_adapter.json): "
                         "say --trained_in_4bit true (QLoRA) or false")
    base = ModelConfig(name_or_path=args.base, load_in_4bit=args.trained_in_4bit, quant_type=args.quant_type,
                       double_quant=args.double_quant, trust_remote_code=args.trust_remote_code,
                       base_adapters=[] if foreign else None)  # an adapter from elsewhere: nothing stacked under it
    out = export(base, args.adapter, args.out, args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
