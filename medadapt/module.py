"""CausalLMModule: one LightningModule for every causal-LM training stage (SFT, continual pretraining).

Loss is token-weighted over the whole optimizer step: the sum of per-token losses over every
micro-batch of the accumulation window and every DDP rank, divided by the number of supervised tokens
in all of them. A mean of per-batch means would weight a short answer's tokens more than a long
one's and make batch 4 × accumulation 1 differ from batch 1 × accumulation 4. As in torchtune, each
micro-batch back-propagates its summed loss and the gradients are rescaled once the step's token count
is known (``on_before_optimizer_step``, before clipping and before the optimizer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from medadapt.checkpoints import checked_lora, checkpoint_record, load_checkpoint, record_of
from medadapt.model import (AdapterMismatchError, LoraConfig, ModelConfig, load_model, load_tokenizer,
                            read_adapter_metadata, resolve_model_config, trained_on, unwrapped, write_adapter_metadata)
from medadapt.attention import VARLEN, flex_bucket
from medadapt.eval.stage import TestStage
from medadapt.fingerprint import adapter_digest
from medadapt.loss import chunked_cross_entropy
from medadapt.optim import OptimConfig, resolve_warmup, use_fused, warmup_cosine
from medadapt.rl.grpo import GRPOConfig

log = logging.getLogger(__name__)

#: attention implementations that take the packed batch's segment boundaries instead of a mask
VARLEN_KERNELS = (VARLEN, "flash_attention_2")


class CausalLMModule(TestStage, L.LightningModule):
    """A (4-bit) causal LM with a LoRA adapter, trained on packed batches with a token-weighted loss.

    Args:
        model: Base model to load (hub id, local folder or packaged name) and its quantization.
        lora: LoRA adapter; null trains no adapter (full fine-tuning, only sensible unquantized).
        optim: Optimizer and learning-rate schedule.
        adapter_dir: Where the final adapter is exported in PEFT format at the end of fit; null
            puts it in ``<checkpoint dir>/adapter`` (or ``<log dir>/adapter``).
        init_adapter: A PEFT adapter folder to start from instead of a fresh LoRA (e.g. to
            continue training an exported adapter, or to evaluate one with ``test``).
        results_dir: Where ``test`` writes ``results.json`` (per-task n, acc, acc_norm, 95% CIs,
            averages, provenance) and ``predictions.jsonl`` (one line per item).
        rl: Train by reinforcement learning with verifiable rewards (GRPO, ``rl/grpo.py``) instead of next-token
            loss: with ``medadapt.rl.data.VerifiableQADataModule``; the base adapters (an SFT adapter) stay frozen
            under the fresh LoRA, and the reference is the model with that LoRA off. Null: SFT / CPT.
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        lora: Optional[LoraConfig] = LoraConfig(),
        optim: OptimConfig = OptimConfig(),
        adapter_dir: Optional[str] = None,
        init_adapter: Optional[str] = None,
        results_dir: str = "results/run",
        rl: Optional[GRPOConfig] = None,
    ):
        super().__init__()
        # Plain dicts, not dataclasses: checkpoints then load with torch.load(weights_only=True).
        self.save_hyperparameters({"model": asdict(model), "lora": asdict(lora) if lora else None,
                                   "optim": asdict(optim), "adapter_dir": adapter_dir, "init_adapter": init_adapter,
                                   "results_dir": results_dir, "rl": asdict(rl) if rl is not None else None})
        self.rl_cfg = GRPOConfig(**rl) if isinstance(rl, dict) else rl
        self.model_cfg, self.lora_cfg, self.optim_cfg = model, lora, optim
        self.tokenizer = load_tokenizer(model)
        self.model = None
        self.built_for_training: Optional[bool] = None
        self.resolved_model_cfg: Optional[ModelConfig] = None  # the model as built (open choices settled)
        self.lora_used: Optional[LoraConfig] = None  # the LoRA as built (a checkpoint's shape when resuming)
        self.expected_ckpt_path: Optional[str] = None  # set by the CLI: build for this checkpoint at once
        self.strict_loading = False  # checkpoints hold only trainable tensors; the base is rebuilt
        self._step_stats: Optional[torch.Tensor] = None  # on device: summed over the micro-batches of a step
        self._step_started: Optional[float] = None
        #: tokens one micro-batch holds at most (rows x max_length), told by the run (``cli``); null: the first
        #: batch's size. What ``gradient_checkpointing: auto`` sizes its decision by.
        self.micro_batch_tokens: Optional[int] = None
        self.max_prompt_tokens: Optional[int] = None  # RL: the data's prompt budget, told by the run (``cli``)
        self._checkpointing_pending = False
        self._rl_stats: Optional[dict] = None  # GRPO statistics summed over a step's micro-batches
        self._rl_micro: Optional[int] = None
        self.trained_record: Optional[dict] = None  # set by _load for a training build
        self.init_adapter_digest: Optional[str] = None

    # ---- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model for the Trainer call that runs: for training when it is ``fit`` (k-bit
        preparation, gradient checkpointing, trainable adapter), for inference otherwise. A model that an
        earlier ``validate``/``test`` built for inference is rebuilt when ``fit`` follows."""
        training = self._trainer is None or self.trainer.state.fn in ("fit", None)
        if self.model is None or (training and not self.built_for_training):
            self.build_model(training=training, ckpt_path=self.expected_ckpt_path)

    def build_model(self, *, training: bool, ckpt_path: Optional[str] = None) -> None:
        """Load base (+ quantization) + base adapters + the adapter to train or evaluate.

        Choices the config leaves open (``load_in_4bit``, ``base_adapters``: null) follow the weights being
        loaded: the metadata written beside an exported adapter, or a checkpoint's record. The base model and
        LoRA shape must agree with them: a mismatch is an error, never a silent switch.
        """
        record = checkpoint_record(ckpt_path) if ckpt_path else None
        cfg, lora = self.settle(record, f"checkpoint {ckpt_path}", training=training)
        self._load(cfg, lora, training)

    def settle(self, record: Optional[dict], source: str, *, training: bool) -> tuple[ModelConfig, Optional[LoraConfig]]:
        """The model config and LoRA to build, given what a checkpoint (``record``) was trained with.

        With both an adapter and a checkpoint, the checkpoint must have been trained from that very adapter
        (by content): its tensors replace the adapter's, and its own base adapters would otherwise be dropped."""
        trained, lora, foreign = None, self.lora_cfg, False
        if self.init_adapter_path:
            meta = read_adapter_metadata(self.init_adapter_path)
            if record is not None and record.get("init_adapter_digest") != adapter_digest(self.init_adapter_path):
                raise AdapterMismatchError(
                    f"{source} was not trained from adapter {self.init_adapter_path} (its record names "
                    f"{'another adapter' if record.get('init_adapter_digest') else 'none'}): give the checkpoint "
                    "alone (model.init_adapter: null), or the adapter alone")
            trained, source, lora, foreign = meta["base"], f"adapter {self.init_adapter_path}", None, meta["foreign"]
        elif record is not None:
            trained, lora = record["base"], checked_lora(self.lora_cfg, record["lora"], source)
        elif not training:
            lora = None  # evaluating the plain base: a fresh (zero) LoRA would change nothing
        return resolve_model_config(self.model_cfg, trained, source, training=training, foreign=foreign), lora

    def _load(self, cfg: ModelConfig, lora: Optional[LoraConfig], training: bool) -> None:
        if self.rl_cfg is not None and cfg.attn_implementation in ("auto", "varlen"):
            cfg = replace(cfg, attn_implementation="sdpa")  # RL batches are padded prompts + completions, not packed
        self.model = load_model(cfg, lora, adapter=self.init_adapter_path, training=training)
        self.resolved_model_cfg, self.lora_used, self.built_for_training = cfg, lora, training
        self._checkpointing_pending = training and cfg.gradient_checkpointing == "auto" and self.rl_cfg is None
        self.trained_record = trained_on(cfg) if training else None  # what checkpoints and the adapter record
        self.init_adapter_digest = (adapter_digest(self.init_adapter_path)  # the adapter this run continues
                                    if training and self.init_adapter_path else None)
        if training and rank_zero():
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.model.parameters())
            log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    @property
    def init_adapter_path(self) -> Optional[str]:
        return self.hparams.init_adapter

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder hidden states of a packed batch. Packing is described by restarted ``position_ids``: with no
        attention mask given (and no cache), transformers builds the block-diagonal causal mask from them for
        sdpa, eager and flex attention. The varlen kernels (medadapt's ``varlen``, ``flash_attention_2``) take
        the batch's segment boundaries instead (``cu_seq_lens``, from the collate function): no mask at all,
        no host sync. A packed example gets the logits it gets alone (tests/data/test_packing.py,
        tests/test_attention.py)."""
        model = unwrapped(self.model)
        impl, kwargs = model.config._attn_implementation, {}
        input_ids, position_ids = batch["input_ids"], batch["position_ids"]
        if "cu_seq_lens" in batch and impl in VARLEN_KERNELS:
            kwargs = {"cu_seq_lens_q": batch["cu_seq_lens"], "cu_seq_lens_k": batch["cu_seq_lens"],
                      "max_length_q": batch["max_length"], "max_length_k": batch["max_length"]}
        elif impl == "flex_attention":  # bounded recompiles: a few bucketed widths
            input_ids, position_ids = flex_bucket(input_ids, position_ids)
        out = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state[:, : batch["input_ids"].shape[1]]

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over supervised tokens, and their count (both on device). The LM head
        runs only on supervised positions, in chunks (``loss.py``): no full-vocabulary logits."""
        head = unwrapped(self.model).get_output_embeddings()
        loss = chunked_cross_entropy(self(batch), head, batch["target_index"], batch["targets"])
        return loss, torch.tensor(batch["targets"].shape[0], device=loss.device)

    # ---- training --------------------------------------------------------------------------------
    #: per optimizer step, summed over micro-batches and ranks (kept on device until the step)
    STEP_STATS = ("tokens", "loss_sum", "padding", "positions", "examples")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.rl_cfg is not None:
            from medadapt.rl.step import grpo_step

            loss, stats = grpo_step(self, batch)
            stats["loss"] = loss.detach().float()
            self._rl_stats = stats if self._rl_stats is None else {k: self._rl_stats[k] + v for k, v in stats.items()}
            self._rl_micro = (self._rl_micro or 0) + 1
            return loss
        if self._checkpointing_pending:
            self.settle_checkpointing(batch)
        if self._step_started is None:
            self._step_started = time.perf_counter()
        loss, n = self.loss_sum(batch)
        segments = batch["segment_ids"]
        stats = torch.stack([n.double(), loss.detach().double(), (segments == 0).sum().double(),
                             torch.tensor(segments.numel(), dtype=torch.float64, device=segments.device),
                             segments.amax(dim=1).sum().double()])  # segments are numbered 1..k per row
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats
        # Lightning divides this by accumulate_grad_batches; on_before_optimizer_step undoes that.
        return loss

    def settle_checkpointing(self, batch: dict[str, torch.Tensor]) -> None:
        """``gradient_checkpointing: auto``: measure, decide (the same on every rank), log (``checkpointing.py``).
        The probe runs under the step's autocast, on its own RNG stream, so the run draws what it would have."""
        from medadapt.checkpointing import decide, set_checkpointing

        self._checkpointing_pending = False
        tokens = self.micro_batch_tokens or batch["input_ids"].numel()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            on, figures = decide(self.model, batch, self, tokens, self.device)
        on = bool(self.trainer.strategy.reduce(torch.tensor(float(on), device=self.device), reduce_op="sum") > 0)
        set_checkpointing(self.model, on)
        if rank_zero():
            log.info("activation checkpointing %s: activations of %s tokens per micro-batch ≈ %.1f GiB (%.0f KiB per "
                     "token), %.1f GiB free (model.gradient_checkpointing: auto)", "on" if on else "off",
                     f"{figures['tokens']:,}", figures["activations_gib"], figures["bytes_per_token"] / 1024,
                     figures["free_gib"])

    def on_before_optimizer_step(self, optimizer) -> None:
        """Rescale the step's gradients to a token-weighted mean and log the step (one host sync per step)."""
        if self.rl_cfg is not None:
            return self.log_rl_step(optimizer)
        totals = self.trainer.strategy.reduce(self._step_stats, reduce_op="sum")
        tokens, loss_sum, padding, positions, examples = totals.tolist()
        # DDP averages gradients over ranks and Lightning divided each micro-batch loss by
        # accumulate_grad_batches: both factors come back, then divide by the step's token count.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(tokens, 1.0)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        metrics = {}
        if grads:
            torch._foreach_mul_(grads, scale)
            metrics["train/grad_norm"] = grad_norm(grads)
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        loss = loss_sum / max(tokens, 1.0)
        metrics.update({
            "train/loss": loss,
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/examples_per_step": examples,
            "train/tokens_per_step": positions - padding,
            "train/supervised_tokens_per_step": tokens,
            "train/tokens_per_s": (positions - padding) / elapsed if elapsed > 0 else 0.0,
            "train/supervised_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "train/supervised_fraction": tokens / max(positions, 1.0),
            "train/padding_fraction": padding / max(positions, 1.0),
        })
        step = self.trainer.global_step + 1  # this optimizer step's number, as in the checkpoint names
        if step == 1 or step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log_at_step(metrics, step)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.last_step_loss = loss
        self._step_stats, self._step_started = None, None

    def log_at_step(self, metrics: dict[str, float], step: int) -> None:
        """Write to every logger at the optimizer step the numbers belong to. (``self.log`` from inside
        the step writes at Lightning's counter, which increments after the hooks: one step early.)"""
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def log_rl_step(self, optimizer) -> None:
        """A GRPO step's logs: reward mean and spread, KL, completion length, clipped fraction, the share of groups
        whose rewards were all equal (no signal), unparsable completions, gradient norm, learning rate."""
        stats = {k: v / self._rl_micro for k, v in self._rl_stats.items()}
        stats = dict(zip(stats, self.trainer.strategy.reduce(torch.stack(list(stats.values())), reduce_op="mean").tolist()))
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        metrics = {f"rl/{k}": v for k, v in stats.items() if k not in ("tokens", "loss")}
        if grads:
            metrics["train/grad_norm"] = grad_norm(grads)
        metrics.update({"train/loss": stats["loss"], "train/lr": optimizer.param_groups[0]["lr"]})
        step = self.trainer.global_step + 1
        if step == 1 or step % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log_at_step(metrics, step)
        self.log("reward", stats["reward_mean"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.last_step_loss, self.last_rl_stats = stats["loss"], stats
        self._rl_stats, self._rl_micro = None, None

    # ---- validation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.rl_cfg is not None:  # greedy answers to held-out questions, read by the test stage's reader
            from medadapt.rl.step import heldout_correct

            right, asked = heldout_correct(self, batch)
            self._val_sums += torch.tensor([right, asked], dtype=torch.float64, device=self.device)
            return
        loss, n = self.loss_sum(batch)
        self._val_sums += torch.stack([loss.double(), n.double()])

    def on_validation_epoch_end(self) -> None:
        """Token-weighted over the whole validation set and every rank (plain sums: no state to leak
        between inference-mode and no-grad runs, which a torchmetrics state tensor would)."""
        loss_sum, tokens = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if self.rl_cfg is not None and tokens:
            self.log("val/heldout_acc", loss_sum / tokens, prog_bar=True, rank_zero_only=True, logger=False)
            self.log_at_step({"val/heldout_acc": loss_sum / tokens}, self.trainer.global_step)
            return
        if tokens:
            in_fit = self.trainer.state.fn == "fit"
            self.log("val/loss", loss_sum / tokens, prog_bar=True, rank_zero_only=True, logger=not in_fit)
            if in_fit:  # after N optimizer steps: logged at step N, beside that step's train/loss
                self.log_at_step({"val/loss": loss_sum / tokens}, self.trainer.global_step)

    # ---- test: the leaderboard benchmarks live in eval/stage.py (TestStage) -----------------------------
    def teardown(self, stage: str) -> None:
        self.on_test_end()  # also after a failed run: the folder is free again
        server, self._vllm_server = getattr(self, "_vllm_server", None), None
        if server is not None:  # RL rollouts' vLLM engine
            server.close()

    @property
    def rl_max_model_len(self) -> int:
        """The longest sequence an RL rollout engine must hold: the data's prompt budget plus the completion's."""
        return int(self.max_prompt_tokens or 2048) + self.rl_cfg.max_new_tokens + 8

    # ---- optimizer ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay, embeds = [], [], []
        save_names = tuple(self.lora_used.modules_to_save or []) if self.lora_used else ()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if cfg.embedding_lr is not None and any(f".{m}." in f".{name}" for m in save_names):
                embeds.append(p)
            elif p.ndim < 2:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if embeds:
            groups.append({"params": embeds, "weight_decay": 0.0, "lr": cfg.embedding_lr})
        groups = [g for g in groups if g["params"]]
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                      fused=use_fused(cfg.fused, params, self.trainer) or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = resolve_warmup(cfg, total)
        log.info("schedule: %d optimizer steps, %d of warmup (%.1f%%)", total, warmup, 100 * warmup / total)
        self.schedule = {"total": total, "warmup": warmup}
        factor = warmup_cosine(warmup, total, cfg.min_lr_ratio)
        check_resumed_schedule(getattr(self, "_resumed", None), self.schedule, cfg.lr, cfg.min_lr_ratio)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning refuses to clip for any fused optimizer under mixed precision, though only fp16's grad
        scaler makes that wrong. Without a scaler (bf16-mixed, 32-true) the gradients are plain: clip here."""
        from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and _optimizer_handles_unscaling(optimizer):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors (a 4-bit base cannot be reloaded from a state dict anyway) and
        every rank's RNG state, so LoRA dropout after a resume draws the masks it would have drawn."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # what the tensors were trained on, settled (the hparams hold the config, with its open choices)
        checkpoint["medadapt"] = {"base": self.trained_record or trained_on(self.resolved_model_cfg),
                                  "lora": asdict(self.lora_used) if self.lora_used else None,
                                  "init_adapter_digest": self.init_adapter_digest,
                                  "schedule": getattr(self, "schedule", None)}
        checkpoint["rng"] = {"cpu": self._gather_rng(torch.get_rng_state())}
        if torch.cuda.is_available() and self.device.type == "cuda":
            checkpoint["rng"]["cuda"] = self._gather_rng(torch.cuda.get_rng_state(self.device))

    def _gather_rng(self, state: torch.Tensor) -> torch.Tensor:
        gathered = self.all_gather(state.to(self.device))  # dump_checkpoint runs on every rank
        return (gathered if self.trainer.world_size > 1 else gathered[None]).cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint against the model built for it (Lightning restores after ``configure_model``):
        a model built without knowing the checkpoint (``trainer.test(module, ckpt_path=…)`` from Python) is
        rebuilt as the checkpoint requires, before its tensors are loaded."""
        cfg, lora = self.settle(record_of(checkpoint), "checkpoint", training=bool(self.built_for_training))
        if (cfg, lora) != (self.resolved_model_cfg, self.lora_used):
            self._load(cfg, lora, bool(self.built_for_training))
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        missing = expected - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}; "
                               "was it written with another LoRA configuration?")
        shapes = [(n, tuple(t.shape), tuple(params[n].shape)) for n, t in checkpoint["state_dict"].items()
                  if n in params and tuple(t.shape) != tuple(params[n].shape)]
        if shapes:
            n, got, want = shapes[0]
            raise AdapterMismatchError(f"checkpoint holds {len(shapes)} tensors of other shapes than this model's "
                                       f"LoRA (e.g. {n}: {list(got)} vs {list(want)}): it was trained with another "
                                       "rank or target modules; load it without a conflicting adapter or LoRA setting")
        self._resumed_rng = checkpoint.get("rng")
        self._resumed = {"schedule": record_of(checkpoint).get("schedule"), "step": checkpoint.get("global_step", 0)}

    def on_train_start(self) -> None:
        rng, self._resumed_rng = getattr(self, "_resumed_rng", None), None
        if rng is None:
            return
        rank = self.trainer.global_rank
        if rank < len(rng["cpu"]):
            torch.set_rng_state(rng["cpu"][rank])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"][rank], self.device)

    def on_fit_end(self) -> None:
        if self.lora_used is None and not self.init_adapter_path:
            return
        path = self.adapter_export_dir()
        if self.trainer.is_global_zero:
            # only the trained adapter: base adapters stay in their own folders, named by the metadata
            self.model.save_pretrained(path, safe_serialization=True, selected_adapters=["default"])
            self.tokenizer.save_pretrained(path)
            write_adapter_metadata(path, self.resolved_model_cfg, self.lora_used, self.trained_record)
            log.info("exported PEFT adapter to %s", path)
        self.trainer.strategy.barrier()

    def adapter_export_dir(self) -> str:
        if self.hparams.adapter_dir:
            return self.hparams.adapter_dir
        ckpt = self.trainer.checkpoint_callback
        base = ckpt.dirpath if ckpt is not None and ckpt.dirpath else (self.trainer.log_dir or ".")
        return str(Path(base) / "adapter")


def grad_norm(grads: list[torch.Tensor]) -> float:
    """The global L2 norm of a step's gradients (one host sync)."""
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads]))))


def check_resumed_schedule(resumed: Optional[dict], schedule: dict, lr: float, min_ratio: float) -> None:
    """A resumed run says what its schedule does: nothing left to train is an error (it would "train" at the ended
    cosine's learning rate and report success); a schedule that changed since the checkpoint is logged with the
    learning rate the run continues at."""
    if not resumed:
        return
    step, before = resumed["step"], resumed.get("schedule")
    if step >= schedule["total"]:
        raise ValueError(f"the checkpoint is at optimizer step {step} and this run's schedule ends at step "
                         f"{schedule['total']}: nothing is left to train. Raise trainer.max_steps/max_epochs and "
                         "start over (--overwrite true), or evaluate the checkpoint")
    if before and before != schedule:
        log.warning("resuming at step %d of a schedule planned for %d steps (%d warmup); this run plans %d (%d "
                    "warmup): from here the learning rate follows the new schedule (%.3g now, not the old %.3g)",
                    step, before["total"], before["warmup"], schedule["total"], schedule["warmup"],
                    lr * warmup_cosine(schedule["warmup"], schedule["total"], min_ratio)(step),
                    lr * warmup_cosine(before["warmup"], before["total"], min_ratio)(step))


def load_for_inference(model: ModelConfig, lora: Optional[LoraConfig] = None, init_adapter: Optional[str] = None,
                       ckpt_path: Optional[str] = None) -> CausalLMModule:
    """The module with its weights ready to generate outside a Trainer (``ask``): base model, an
    exported PEFT adapter, or a LoRA checkpoint of a fit run (its LoRA shape is read from it)."""
    module = CausalLMModule(model=model, lora=lora, init_adapter=init_adapter)
    module.build_model(training=False, ckpt_path=ckpt_path)
    if ckpt_path:
        checkpoint = load_checkpoint(ckpt_path, mmap=False)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.model.eval()
    if torch.cuda.is_available() and not module.resolved_model_cfg.load_in_4bit:
        module.model.cuda()
    return module


def rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
