"""SFT training speed as ``python -m medadapt fit`` runs it, against the seed's ``transformers.Trainer``, in one run.

    python benchmarks/fit_speed.py --model-dir DIR --sft FILE --tokenizer TOK   # a GPU (gpu_check.sh does this)
    python benchmarks/fit_speed.py --tiny                                      # CPU proof: 2 layers, 256-token rows

Every medadapt arm is ``configs/sft.yaml`` parsed by medadapt's own CLI (``build_cli``) with the model swapped for
DIR (the R1-Distill-Qwen-1.5B architecture, random weights: speed does not depend on their values) and the data
for the shared o1 sample (its real lengths under the R1 tokenizer, through the real data module), then
``Trainer.fit`` for warm-up + timed optimizer steps: the module's training step under the Trainer's precision
plugin (bf16-mixed autocast), packing, the chunked loss, fused AdamW, clipping, as ``fit`` runs them. Arms:

  seed-trainer  transformers.Trainer itself with the seed's TrainingArguments (fp16, batch 2 x accumulation 4,
                adamw_torch_fused, padded batches, gradient checkpointing) on the seed's 4-bit LoRA model (PEFT's
                fp32 upcast and LoRA forward, sdpa, not compiled: ``seed_configs``)
  sft.yaml      configs/sft.yaml as shipped: every ``auto`` (attention, checkpointing, Liger, compile), bf16 frozen
                base, medadapt's LoRA forward, padding-free varlen rows, 3 rows x 1 (right after the seed arm)
  issue-19      issue 26's settings set back: fp32 frozen base, PEFT's LoRA forward, no compilation (its changes
                that are not settings stay: the loss's head twice per chunk, padding-free rows, no host syncs)
  fp32-frozen, peft-lora, no-compile, dropout0   that one of issue 26's levers undone (or, dropout0, added) alone
  sdpa          the attention lever baseline: sdpa, checkpointing on, 1 row x 3, no Liger
  varlen, flash_attention_2, flex_attention   that attention alone (the last two where they run)
  no-ckpt       checkpointing off alone;  micro3: 3 rows x 1 alone;  liger: Liger alone (where installed)
  ckpt-4096     sft.yaml with checkpointing forced on, one row of 4,096 tokens: its peak memory (goal ≤ 8 GB)
  all           every lever: the best attention here, no checkpointing, 3 x 1, Liger where installed

Every arm runs in a process of its own (nothing an earlier arm left in memory, no patch Liger made, changes a later
one; the memory allocated when it starts is reported). Reported per arm: real (non-padding) tokens/s over the timed
steps; MFU two ways against the card's dense bf16 peak: ``6N`` per real token (N = matmul weights of the decoder and
the LM head: every weight trained, an overcount for a frozen base) and the frozen-base count, what the step really
multiplies: 4 × decoder weights (forward, and the gradient with respect to activations; no weight gradient for the
frozen 4-bit base) + 6 × LoRA weights + 4 × LM head, + 2 × decoder weights more with activation checkpointing
(recompute); attention FLOPs are not counted in either (a lower bound); peak allocated memory over the timed
steps; the ratio to seed-trainer; the loss of each optimizer step. Every medadapt arm starts from the same weights and LoRA init on
the same first rows, so its first loss must equal sft.yaml's within bf16 noise (``LOSS_RTOL``; the seed's
Trainer sees other examples per step and weighs them per micro-batch: its loss is shown, not compared). Each
attention arm also checks, after its run, that a packed example's logits equal the example's alone through
sdpa (``packed_max_rel``): an arm that disagrees computes something else. Where layers are compiled, what
compilation did (``compile_watch.py``: graphs, graph breaks, and any recompile-limit hit, after which dynamo runs
the layers eager and the arm no longer times compiled layers).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO)]
from compile_watch import CompileWatch  # noqa: E402
from scratch import scratch_dir  # noqa: E402
SHARED = REPO.parent / "shared"

R1_DISTILL_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, rope_theta=10000.0, max_position_embeddings=131072,
                       tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
#: first-step losses of the medadapt arms agree within this (bf16 autocast, different kernels)
LOSS_RTOL = 1e-2
#: a packed example's logits against the example alone, relative to the largest |logit| (bf16)
PACKED_RTOL = 5e-2
#: arms that pack other rows (longer), so their first loss is not sft.yaml's
OTHER_ROWS = ("ckpt-4096",)


def build_model_dir(arch: dict, tokenizer: str, out: Path) -> str:
    """The architecture with random weights (bf16 on a GPU), saved with the tokenizer as a HF folder."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(Qwen2Config(**{**arch, "vocab_size": max(arch["vocab_size"], len(tok))},
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.to(torch.bfloat16 if cuda else torch.float32).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def matmul_params(arch: dict) -> int:
    """Weights that take part in matmuls (decoder projections + LM head), counted from the config."""
    return decoder_params(arch) + arch["vocab_size"] * arch["hidden_size"]


def decoder_params(arch: dict) -> int:
    d, i = arch["hidden_size"], arch["intermediate_size"]
    kv = arch["num_key_value_heads"] * (d // arch["num_attention_heads"])
    return arch["num_hidden_layers"] * (2 * d * d + 2 * d * kv + 3 * d * i)


def lora_params(arch: dict, r: int = 16) -> int:
    """LoRA r on every linear projection of the decoder: r x (in + out) per projection."""
    d, i = arch["hidden_size"], arch["intermediate_size"]
    kv = arch["num_key_value_heads"] * (d // arch["num_attention_heads"])
    return arch["num_hidden_layers"] * r * (2 * (d + d) + 2 * (d + kv) + 3 * (d + i))


def frozen_base_flops(arch: dict, checkpointing: bool) -> int:
    """FLOPs per token of a QLoRA step: frozen decoder 4N (+2N recompute), LoRA 6N, LM head 4N."""
    head = arch["vocab_size"] * arch["hidden_size"]
    return 2 * ((2 + (1 if checkpointing else 0)) * decoder_params(arch) + 3 * lora_params(arch) + 2 * head)


def peak_tflops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_clock(warmup: int):
    import lightning as L

    class StepClock(L.Callback):
        """Real tokens, seconds and peak memory of the optimizer steps after ``warmup``, and every step's loss
        (device counters: one sync when the clock starts and one at the end)."""

        def __init__(self):
            self.start, self.seconds, self.tokens, self.losses, self.peak = None, None, None, [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == warmup and self.start is None:
                sync()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                self.start, self.tokens = time.perf_counter(), torch.zeros((), device=batch["input_ids"].device)
            if self.start is not None:
                self.tokens += (batch["segment_ids"] > 0).sum()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step > len(self.losses):  # an optimizer step just ran: its loss, read at the end
                self.losses.append(module.last_step_loss)

        def on_train_end(self, trainer, module):
            sync()
            self.seconds = time.perf_counter() - self.start
            self.tokens = int(self.tokens)
            self.losses = [float(x) for x in self.losses]
            self.peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    return StepClock()


def arm_args(ctx: dict, work: Path, overrides: list[str]) -> list[str]:
    """The ``fit`` arguments of a medadapt arm: configs/sft.yaml, this run's model and rows, ``overrides`` last."""
    return ["--config", str(REPO / "configs" / "sft.yaml"), "--model.model.name_or_path", ctx["model_dir"],
            "--model.adapter_dir", str(work / "adapter"), "--data.init_args.data_files", ctx["sft"],
            "--data.init_args.max_rows", "null", "--data.init_args.val_fraction", "0",
            "--data.init_args.num_workers", "0", "--data.init_args.max_length", str(ctx["seq"]),
            "--trainer.max_steps", str(ctx["warmup"] + ctx["steps"]), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(work), *ctx["extra"], *overrides]


def medadapt_arm(ctx: dict, overrides: list[str], attention: str | None) -> dict:
    """configs/sft.yaml through medadapt's CLI parser, ``overrides`` on top, fit for warm-up + timed steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from medadapt.lightning_cli import build_cli
    from medadapt.model import is_compiled

    work = Path(tempfile.mkdtemp(dir=ctx["tmp"]))
    cli = build_cli(arm_args(ctx, work, overrides), run=False)
    trainer, module = cli.trainer, cli.model
    clock = make_clock(ctx["warmup"])
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)] + [clock]
    with CompileWatch() as watch:
        trainer.fit(module, datamodule=cli.datamodule)
    result = {"tokens_per_s": clock.tokens / clock.seconds, "peak_gib": clock.peak, "losses": clock.losses,
              "attention": module.model.get_base_model().config._attn_implementation,
              "checkpointing": module.model.get_base_model().is_gradient_checkpointing,
              "micro_batch_rows": cli.datamodule.batch_size, "accumulation": trainer.accumulate_grad_batches,
              "compile": {"compiled": is_compiled(module.model), **watch.report()}}
    if (work / "adapter" / "adapter_config.json").exists():
        result["adapter"] = str(work / "adapter")  # the test stage of gpu_check scores it
    if attention is not None:
        result["packed_max_rel"] = packed_vs_alone(module, cli.datamodule)
        if result["packed_max_rel"] > PACKED_RTOL:
            result["error"] = f"packed logits differ from alone: {result['packed_max_rel']:.3g} of scale"
    del cli, trainer, module
    free_memory()
    return result


def packed_vs_alone(module, data) -> float:
    """Max |logit difference| of the first packed row's examples against each alone through sdpa, relative to the
    largest |logit|, under the run's autocast (no dropout)."""
    from medadapt.data.packing import collate

    base = module.model.get_base_model()
    row = data.train_rows.rows[0][:3]
    device = next(module.model.parameters()).device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impl = base.config._attn_implementation
    module.model.eval()
    worst = scale = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([row], pad_id=0).items()}
        logits = base.lm_head(module(packed)).float()
        base.set_attn_implementation("sdpa")
        start = 0
        for ex in row:
            n = len(ex["input_ids"])
            ids = torch.tensor([ex["input_ids"]], device=device)
            alone = base(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=False).logits.float()
            worst = max(worst, float((logits[0, start : start + n] - alone[0]).abs().max()))
            scale = max(scale, float(alone.abs().max()))
            start += n
        base.set_attn_implementation(impl)
    return worst / max(scale, 1e-30)


def seed_configs(model_dir: str, cuda: bool):
    """The seed's model, stated field by field rather than taken from medadapt's defaults: nf4 with double
    quantization, PEFT's ``prepare_model_for_kbit_training`` (frozen weights upcast to fp32), PEFT's LoRA forward
    (r16, α32, dropout 0.05, all linear), no compiled layers, sdpa with gradient checkpointing, no Liger; fp16 compute
    on CUDA (the seed ran fp16 on a P100). An arm built on the defaults would time issue 26's levers as the seed's."""
    from medadapt.model_config import LoraConfig, ModelConfig

    model = ModelConfig(name_or_path=model_dir, load_in_4bit=True, quant_type="nf4", double_quant=True,
                        compute_dtype="float16" if cuda else "float32", attn_implementation="sdpa",
                        gradient_checkpointing=True, liger=False, frozen_dtype="float32", compile=False)
    return model, LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear", fused=False)


def seed_examples(sft_file: str, tokenizer, max_length: int, truncate: bool) -> list[dict]:
    """The SFT rows as the seed trains them: one tokenized example each (chat template, assistant-only labels), no
    packing (step_traffic prices the seed's padding from the same examples)."""
    from medadapt.data.reasoning import ReasoningSFTDataModule

    data = ReasoningSFTDataModule(data_files=sft_file, max_rows=None, val_fraction=0.0, pack=False,
                                  max_length=max_length, truncate=truncate)
    data.connect(tokenizer)
    data.setup("fit")
    return [row[0] for row in data.train_rows.rows]


def seed_trainer_arm(ctx: dict) -> dict:
    """transformers.Trainer with the seed's TrainingArguments, padded micro-batches of 2, on the seed's 4-bit LoRA
    model (``seed_configs``; the seed ran fp16 on a P100: compute dtype float16 with the fp16 grad scaler)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from medadapt.model import load_model
    from medadapt.model_config import load_tokenizer

    cuda = torch.cuda.is_available()
    cfg, lora = seed_configs(ctx["model_dir"], cuda)
    tok = load_tokenizer(cfg)
    examples = seed_examples(ctx["sft"], tok, ctx["seq"], ctx["truncate"])
    torch.manual_seed(4242)
    model = load_model(cfg, lora, training=True)
    tokens: list[int] = []  # per micro-batch, in the order the collator made them

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        tokens.append(sum(len(f["input_ids"]) for f in features))
        pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
        ids = [f["input_ids"] for f in features]
        return {"input_ids": torch.tensor(pad(ids, tok.pad_token_id)),
                "attention_mask": torch.tensor(pad([[1] * len(x) for x in ids], 0)),
                "labels": torch.tensor(pad([f["labels"] for f in features], -100))}

    state = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == ctx["warmup"] and "start" not in state:
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                state["start"] = time.perf_counter()

        def on_train_end(self, args, st, control, **kw):
            sync()
            state["seconds"] = time.perf_counter() - state["start"]

    args = TrainingArguments(output_dir=str(Path(ctx["tmp"]) / "seed-trainer"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, learning_rate=1e-4, warmup_steps=300,
                             lr_scheduler_type="cosine", weight_decay=0.01, fp16=cuda, optim="adamw_torch_fused",
                             max_steps=ctx["warmup"] + ctx["steps"], logging_steps=1, report_to=[], save_strategy="no",
                             seed=4242, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    micro = 4
    timed = sum(tokens[ctx["warmup"] * micro : (ctx["warmup"] + ctx["steps"]) * micro])
    result = {"tokens_per_s": timed / state["seconds"],
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "attention": "sdpa", "checkpointing": True, "micro_batch_rows": 2, "accumulation": micro}
    del trainer, model
    free_memory()
    return result


def arm_plan(cuda: bool) -> dict[str, tuple[list[str], str | None]]:
    """name → (CLI overrides on configs/sft.yaml, the attention it times or None), in the order they run: the seed's
    Trainer and sft.yaml first (a time budget cuts the tail), flex_attention (a compile per new length) last."""
    lever = ["--model.model.attn_implementation", "sdpa", "--model.model.gradient_checkpointing", "true",
             "--model.model.liger", "false", "--data.init_args.batch_size", "1",
             "--trainer.accumulate_grad_batches", "3"]

    def alone(*pairs: str) -> list[str]:
        return lever + list(pairs)

    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    flash2 = cuda and importlib.util.find_spec("flash_attn") is not None
    best = "flash_attention_2" if flash2 else "varlen"
    plan = {"sft.yaml": ([], "auto"),
            "issue-19": (["--model.model.frozen_dtype", "float32", "--model.lora.fused", "false",
                          "--model.model.compile", "false"], None),
            "fp32-frozen": (["--model.model.frozen_dtype", "float32"], None),
            "peft-lora": (["--model.lora.fused", "false"], None),
            "no-compile": (["--model.model.compile", "false"], None),
            "dropout0": (["--model.lora.dropout", "0.0"], None),
            "ckpt-4096": (["--model.model.gradient_checkpointing", "true", "--data.init_args.max_length", "4096",
                           "--data.init_args.batch_size", "1", "--trainer.accumulate_grad_batches", "1"], None),
            "sdpa": (alone(), "sdpa"), "varlen": (alone("--model.model.attn_implementation", "varlen"), "varlen")}
    if flash2:
        plan["flash_attention_2"] = (alone("--model.model.attn_implementation", "flash_attention_2"),
                                     "flash_attention_2")
    plan["no-ckpt"] = (alone("--model.model.gradient_checkpointing", "false"), None)
    plan["micro3"] = (alone("--data.init_args.batch_size", "3", "--trainer.accumulate_grad_batches", "1"), None)
    if cuda:  # the fp16 path (GPUs without bf16): grad scaler + clipping, fused AdamW asked for and dropped
        plan["fp16"] = (["--trainer.precision", "16-mixed", "--model.model.compute_dtype", "float16",
                         "--model.model.liger", "false"], None)
    if liger:
        plan["liger"] = (alone("--model.model.liger", "true"), None)
    plan["all"] = (alone("--model.model.attn_implementation", best, "--model.model.gradient_checkpointing", "false",
                         "--data.init_args.batch_size", "3", "--trainer.accumulate_grad_batches", "1",
                         "--model.model.liger", "true" if liger else "false"), best)
    if cuda and importlib.util.find_spec("triton") is not None:
        plan["flex_attention"] = (alone("--model.model.attn_implementation", "flex_attention"), "flex_attention")
    return plan


def run_arm(name: str, ctx: dict, cuda: bool) -> dict:
    """One arm in this process: the memory already allocated when it starts, then its figures."""
    start = {"allocated_at_start_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None,
             "free_at_start_gib": torch.cuda.mem_get_info()[0] / 2**30 if cuda else None}
    result = seed_trainer_arm(ctx) if name == "seed-trainer" else medadapt_arm(ctx, *arm_plan(cuda)[name])
    return {**start, **result}


def isolated(name: str, argv: list[str]) -> dict:
    """``name`` run by this script in a fresh process (``--one``): nothing earlier arms left behind changes it."""
    import os
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--one", name, "--json", path],
                          capture_output=True, text=True, env=env)
    try:
        if proc.returncode:
            return {"error": f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-1500:]}
        return json.loads(Path(path).read_text())["arms"][name]
    finally:
        Path(path).unlink(missing_ok=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU proof: a 2-layer model, 256-token rows (cut to fit)")
    ap.add_argument("--model-dir", help="a model folder of the architecture (default: build the R1-Distill-1.5B "
                                        "architecture, or the tiny one, with random weights, in a temporary folder)")
    ap.add_argument("--tokenizer", default=str(SHARED / "fixtures" / "deepseek-r1-distill-qwen-tokenizer"))
    ap.add_argument("--sft", default=str(SHARED / "data" / "sft" / "medical_o1_reasoning_sample.json"))
    ap.add_argument("--seq", type=int, help="packed row length (default 2048, tiny 256)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps per arm (default 2; tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per arm (default 5; tiny 2)")
    ap.add_argument("--arms", nargs="*", help="run only these arms (default: every arm that runs here)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the arms that would start after this many s")
    ap.add_argument("--in-process", action="store_true", help="every arm in this process (default: one process each)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child of ``isolated``
    ap.add_argument("--tmp", help=argparse.SUPPRESS)  # a child writes in its parent's scratch folder (its adapter outlives it)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # argv is this script's
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    arch = TINY if args.tiny else R1_DISTILL_1_5B
    tmp = args.tmp or str(scratch_dir("fit_speed-"))
    model_dir = args.model_dir or build_model_dir(arch, args.tokenizer, Path(tmp) / "model")
    ctx = {"tmp": tmp, "model_dir": model_dir, "sft": args.sft, "seq": args.seq or (256 if args.tiny else 2048),
           "warmup": args.warmup if args.warmup is not None else (1 if args.tiny else 2),
           "steps": args.steps or (2 if args.tiny else 5), "truncate": args.tiny,
           "extra": (["--data.init_args.truncate", "true", "--data.init_args.max_dropped_fraction", "1.0"]
                     if args.tiny else []) + ([] if cuda else ["--trainer.precision", "32-true"])}
    n = matmul_params(arch)
    card = torch.cuda.get_device_name() if cuda else "CPU (not a GPU run)"
    report = {"device": card, "matmul_params": n, "seq": ctx["seq"], "warmup_steps": ctx["warmup"],
              "timed_steps": ctx["steps"], "flops_convention": "6N per real token, N = decoder + LM head matmul "
              "weights; and the frozen-base count (4N decoder + 6N LoRA + 4N head, + 2N decoder with checkpointing)",
              "frozen_flops": {"on": frozen_base_flops(arch, True), "off": frozen_base_flops(arch, False)}, "arms": {}}
    if args.one:  # a child: one arm, here
        try:
            report["arms"][args.one] = run_arm(args.one, ctx, cuda)
        except Exception as e:  # the parent reports it and goes on
            report["arms"][args.one] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        Path(args.json).write_text(json.dumps(report, indent=2))
        return report
    print(f"fit_speed: {card}; {n / 1e9:.2f}B matmul params, rows of {ctx['seq']}, {ctx['warmup']} + {ctx['steps']} steps")
    child = ["--model-dir", model_dir, "--tokenizer", args.tokenizer, "--sft", args.sft, "--seq", str(ctx["seq"]),
             "--warmup", str(ctx["warmup"]), "--steps", str(ctx["steps"]), "--tmp", tmp] + (["--tiny"] if args.tiny else [])
    for name in ["seed-trainer", *arm_plan(cuda)]:
        if args.arms and name not in args.arms:
            continue
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            report["arms"][name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
            print(f"  {name:18s} skipped (budget)")
            continue
        t0 = time.perf_counter()
        if args.in_process:
            try:
                result = run_arm(name, ctx, cuda)
            except Exception as e:  # one run shows every arm: report and go on
                result = {"error": f"{type(e).__name__}: {e}"[-2000:]}
                free_memory()
        else:
            result = isolated(name, child)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["arms"][name] = result
        summarize_arm(name, result, report)
    finish(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def summarize_arm(name: str, r: dict, report: dict) -> None:
    if "tokens_per_s" not in r:
        print(f"  {name:18s} FAILED: {r.get('error', '')[:300]}")
        return
    peak = peak_tflops()
    r["mfu"] = r["tokens_per_s"] * 6 * report["matmul_params"] / (peak * 1e12) if peak else None
    frozen = report["frozen_flops"]["on" if r["checkpointing"] else "off"]
    r["mfu_frozen"] = r["tokens_per_s"] * frozen / (peak * 1e12) if peak else None
    mfu = (f"{100 * r['mfu']:.1f}% ({100 * r['mfu_frozen']:.1f}% frozen)" if r["mfu"] is not None else "n/a")
    mem = f"{r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else "n/a"
    losses = ", ".join(f"{x:.3f}" for x in r["losses"][:3])
    compiled = CompileWatch.note(r.get("compile"))
    print(f"  {name:18s} {r['tokens_per_s']:9.0f} tok/s  MFU {mfu:>6s}  peak {mem:>9s}  "
          f"at start {r.get('allocated_at_start_gib') or 0:.1f} GiB  "
          f"{r['attention']}, ckpt {'on' if r['checkpointing'] else 'off'}, {r['micro_batch_rows']}x{r['accumulation']}"
          f"  losses {losses}" + (f"  packed Δ {r['packed_max_rel']:.1e}" if "packed_max_rel" in r else "")
          + (f"  {compiled}" if compiled else ""))


def finish(report: dict) -> None:
    """Ratios to the seed's Trainer and the first-loss agreement of the medadapt arms with sft.yaml."""
    arms = report["arms"]
    seed = arms.get("seed-trainer", {}).get("tokens_per_s")
    ref = (arms.get("sft.yaml", {}).get("losses") or [None])[0]
    for name, r in arms.items():
        if "tokens_per_s" not in r:
            continue
        r["ratio_to_seed_trainer"] = r["tokens_per_s"] / seed if seed else None
        if name not in ("seed-trainer", *OTHER_ROWS) and ref is not None and r["losses"]:
            r["first_loss_rel_diff"] = abs(r["losses"][0] - ref) / abs(ref)
            if r["first_loss_rel_diff"] > LOSS_RTOL:
                r["error"] = (r.get("error", "") + f" first loss {r['losses'][0]:.4f} vs sft.yaml {ref:.4f}").strip()
    if seed:
        line = ", ".join(f"{n} {r['ratio_to_seed_trainer']:.2f}x" for n, r in arms.items()
                         if r.get("ratio_to_seed_trainer") and n != "seed-trainer")
        print(f"fit_speed: ratio to the seed's transformers.Trainer: {line}")


def markdown(report: dict) -> list[str]:
    """The arms as a markdown table (gpu_check.md)."""
    lines = [f"## SFT step as `fit` runs it, rows of {report['seq']} ({report['warmup_steps']} warm-up + "
             f"{report['timed_steps']} timed steps; MFU: {report['flops_convention']})", "",
             "| arm | attention | ckpt | rows x accum | tokens/s | MFU 6N | MFU frozen | peak GiB | x seed Trainer | "
             "first losses | packed Δ | note |", "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for name, r in report["arms"].items():
        if "tokens_per_s" not in r:
            lines.append(f"| {name} | | | | | | | | | | | {r.get('skipped') or r.get('error', '')[:120]} |")
            continue
        fmt = lambda v, f: (f.format(v) if v is not None else "n/a")  # noqa: E731
        lines.append(f"| {name} | {r['attention']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['micro_batch_rows']} x {r['accumulation']} | {r['tokens_per_s']:.0f} | "
                     f"{fmt(r.get('mfu') and 100 * r['mfu'], '{:.1f}%')} | "
                     f"{fmt(r.get('mfu_frozen') and 100 * r['mfu_frozen'], '{:.1f}%')} | {fmt(r.get('peak_gib'), '{:.1f}')} | "
                     f"{fmt(r.get('ratio_to_seed_trainer'), '{:.2f}')} | "
                     f"{', '.join(f'{x:.3f}' for x in r['losses'][:3])} | "
                     f"{fmt(r.get('packed_max_rel'), '{:.1e}')} | "
                     f"{'; '.join(filter(None, [CompileWatch.note(r.get('compile')), r.get('error', '')[:120]]))} |")
    return lines + [""]


if __name__ == "__main__":
    main()
