"""How much of a CPT update reaches the SFT stage: merge + re-quantize (the first design) vs stacked adapters.

For each model and update size ρ = ‖ΔW‖/‖W‖ it writes a CPT adapter of that size on the nf4 base, then
builds the stage-2 base both ways and reads every projection's effective weight off the layer's forward
(``medadapt.weights``). The kept share is ⟨W₂ − W_nf4, ΔW⟩ / ‖ΔW‖² (1.0 = the whole update).

    python benchmarks/cpt_kept_share.py                                # tiny random Qwen2 + SmolLM2-135M
    python benchmarks/cpt_kept_share.py --models smollm2-135m-instruct --rho 0.01 0.03

Merged: the CPT adapter merged into the dequantized nf4 weights (``export``), the folder re-loaded in
nf4, as stage 2 loaded it until issue 10. Stacked: the SFT stage's model as ``multistep`` now builds it
(nf4 base, CPT adapter frozen underneath, fresh SFT LoRA on top).
"""

from __future__ import annotations

import argparse

from scratch import scratch_dir
from sft_packing import tiny_model_dir

from medadapt.merge import export
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.weights import kept_share, projection_weights, relative_size, write_scaled_adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"])
    ap.add_argument("--rho", nargs="+", type=float, default=[0.01, 0.03, 0.10])
    args = ap.parse_args()
    work = scratch_dir("cpt_kept_share-")
    print(f"{'model':<24} {'rho':>5} {'merged + re-quantized':>22} {'stacked':>8}")
    for name in args.models:
        path = tiny_model_dir() if name == "tiny" else name
        nf4 = ModelConfig(name_or_path=path, load_in_4bit=True, compute_dtype="float32", gradient_checkpointing=False)
        plain = projection_weights(load_model(nf4, training=False))
        for rho in args.rho:
            cpt_dir = work / f"{name}-{rho}-cpt"
            write_scaled_adapter(nf4, cpt_dir, rho)
            wanted = projection_weights(load_model(nf4, adapter=str(cpt_dir), training=False))
            merged = export(nf4, str(cpt_dir), str(work / f"{name}-{rho}-merged"), dtype="float32")
            requantized = load_model(ModelConfig(name_or_path=str(merged), load_in_4bit=True, compute_dtype="float32",
                                                 gradient_checkpointing=False), training=False)
            stacked = load_model(ModelConfig(name_or_path=path, load_in_4bit=True, compute_dtype="float32",
                                             base_adapters=[str(cpt_dir)], gradient_checkpointing=False),
                                 LoraConfig(r=16, alpha=32, dropout=0.0), training=False).eval()
            old = kept_share(projection_weights(requantized), plain, wanted)
            new = kept_share(projection_weights(stacked), plain, wanted)
            print(f"{name:<24} {relative_size(wanted, plain):>5.3f} {old:>22.3f} {new:>8.3f}")


if __name__ == "__main__":
    main()
