"""AdapterModule: the training core every method's LightningModule stands on (SFT/CPT in ``module.py``, GRPO in
``rl/module.py``).

It owns what does not depend on the objective: building the (4-bit) base with its frozen base adapters and the
LoRA being trained (settled against any checkpoint or adapter being loaded: a mismatch is an error, never a silent
switch), AdamW with warmup-cosine, clipping under mixed precision, checkpoints that hold only trainable tensors plus
a record of what they were trained on and every rank's RNG state (exact resume), and the PEFT adapter exported at
the end of ``fit`` with its metadata. A method adds its step, its validation and its logs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from medadapt.checkpoints import checked_lora, checkpoint_record, record_of
from medadapt.fingerprint import adapter_digest
from medadapt.model import load_model, save_adapter
from medadapt.model_config import LoraConfig, ModelConfig, load_tokenizer
from medadapt.optim import OptimConfig, resolve_warmup, use_fused, warmup_cosine
from medadapt.provenance import (AdapterMismatchError, read_adapter_metadata, resolve_model_config, trained_on,
                                 write_adapter_metadata)

log = logging.getLogger(__name__)


class AdapterModule(L.LightningModule):
    """A (4-bit) causal LM with a LoRA adapter being trained: model, optimizer, checkpoints and export.

    Subclasses call ``__init__`` with the shared settings and ``save_hyperparameters`` with all of theirs, and set
    ``METHOD`` (recorded in the exported adapter's metadata).
    """

    METHOD = "sft"

    def __init__(self, model: ModelConfig, lora: Optional[LoraConfig], optim: OptimConfig,
                 adapter_dir: Optional[str], init_adapter: Optional[str]):
        super().__init__()
        self.model_cfg, self.lora_cfg, self.optim_cfg = model, lora, optim
        self.tokenizer = load_tokenizer(model)
        self.model = None
        self.built_for_training: Optional[bool] = None
        self.resolved_model_cfg: Optional[ModelConfig] = None  # the model as built (open choices settled)
        self.lora_used: Optional[LoraConfig] = None  # the LoRA as built (a checkpoint's shape when resuming)
        self.expected_ckpt_path: Optional[str] = None  # set by the CLI: build for this checkpoint at once
        self.strict_loading = False  # checkpoints hold only trainable tensors; the base is rebuilt
        self.trained_record: Optional[dict] = None  # set by _load for a training build
        self.init_adapter_digest: Optional[str] = None

    @staticmethod
    def shared_hparams(model: ModelConfig, lora: Optional[LoraConfig], optim: OptimConfig, adapter_dir: Optional[str],
                       init_adapter: Optional[str]) -> dict:
        """Plain dicts, not dataclasses: checkpoints then load with ``torch.load(weights_only=True)``."""
        return {"model": asdict(model), "lora": asdict(lora) if lora else None, "optim": asdict(optim),
                "adapter_dir": adapter_dir, "init_adapter": init_adapter}

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

    def model_config_for(self, cfg: ModelConfig) -> ModelConfig:
        """The settled config a method builds with (a method may pin a choice ``auto`` leaves open)."""
        return cfg

    def _load(self, cfg: ModelConfig, lora: Optional[LoraConfig], training: bool) -> None:
        cfg = self.model_config_for(cfg)
        self.model = load_model(cfg, lora, adapter=self.init_adapter_path, training=training)
        self.resolved_model_cfg, self.lora_used, self.built_for_training = cfg, lora, training
        self.trained_record = trained_on(cfg) if training else None  # what checkpoints and the adapter record
        self.init_adapter_digest = (adapter_digest(self.init_adapter_path)  # the adapter this run continues
                                    if training and self.init_adapter_path else None)
        if training and rank_zero():
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.model.parameters())
            log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    def context_length(self) -> Optional[int]:
        """The base model's context (``max_position_embeddings`` of its config), or None where it cannot be read
        without loading (a hub id offline)."""
        from transformers import AutoConfig

        from medadapt.model_config import resolve_model_path

        try:
            config = AutoConfig.from_pretrained(resolve_model_path(self.model_cfg.name_or_path),
                                                revision=self.model_cfg.revision,
                                                trust_remote_code=self.model_cfg.trust_remote_code)
        except Exception:  # noqa: BLE001 (no config reachable: no cap, the data's max_length stands)
            return None
        return getattr(config, "max_position_embeddings", None)

    @property
    def init_adapter_path(self) -> Optional[str]:
        return self.hparams.init_adapter

    def log_at_step(self, metrics: dict[str, float], step: int) -> None:
        """Write to every logger at the optimizer step the numbers belong to. (``self.log`` from inside
        the step writes at Lightning's counter, which increments after the hooks: one step early.)"""
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    # ---- optimizer ---------------------------------------------------------------------------------
    def planned_steps(self) -> int:
        """Optimizer steps this run plans (what the schedule spans)."""
        return max(int(self.trainer.estimated_stepping_batches), 1)

    def gradient_clipping(self) -> Optional[float]:
        """The gradient norm this run clips to (the trainer's ``gradient_clip_val``; a method that steps its optimizer
        itself says its own)."""
        return self.trainer.gradient_clip_val

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
                                      fused=use_fused(cfg.fused, params, self.trainer, self.gradient_clipping()) or None)
        total = self.planned_steps()
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
                                  "schedule": getattr(self, "schedule", None), "method": self.METHOD}
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
        if (self.model_config_for(cfg), lora) != (self.resolved_model_cfg, self.lora_used):
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
        self.check_trained_tensors()
        path = self.adapter_export_dir()
        if self.trainer.is_global_zero:
            # only the trained adapter: base adapters stay in their own folders, named by the metadata
            save_adapter(self.model, path)
            self.tokenizer.save_pretrained(path)
            write_adapter_metadata(path, self.resolved_model_cfg, self.lora_used, self.trained_record,
                                   method=self.METHOD, recipe=self.recipe())
            log.info("exported PEFT adapter to %s", path)
        self.trainer.strategy.barrier()

    def recipe(self) -> dict:
        """How this adapter was trained, as run (not as some config file says): optimizer and schedule, steps, precision,
        devices, the data module's settings and the digest of its fingerprint (local files by content)."""
        from medadapt.fingerprint import digest_value

        trainer = self.trainer
        data = trainer.datamodule
        settings = {k: v for k, v in dict(getattr(data, "hparams", {}) or {}).items() if k not in ("tokenizer",)}
        fingerprint = data.fingerprint() if hasattr(data, "fingerprint") else None
        return {"optim": asdict(self.optim_cfg), "schedule": getattr(self, "schedule", None),
                "optimizer_steps": trainer.global_step, "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": str(trainer.precision),
                "world_size": trainer.world_size, "seed": os.environ.get("PL_GLOBAL_SEED"),
                "data": {"class": f"{type(data).__module__}.{type(data).__name__}" if data is not None else None,
                         "settings": json_safe(settings),
                         "fingerprint": digest_value(fingerprint) if fingerprint is not None else None}}

    def check_trained_tensors(self) -> None:
        """No adapter with NaN or infinite weights is ever exported; one that never left its initialization (every
        LoRA B still zero: no update reached it) is exported with a warning that says so."""
        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        bad = [n for n, p in trained.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise RuntimeError(f"refusing to export the adapter: {len(bad)} of {len(trained)} trained tensors hold "
                               f"NaN/inf (e.g. {bad[0]}); the run's settings made training diverge (learning rate, "
                               "precision, or for RL rl.temperature / rl.std_eps)")
        b = [p for n, p in trained.items() if "lora_B" in n]
        if b and not self.init_adapter_path and all(torch.count_nonzero(p) == 0 for p in b):
            log.warning("the exported adapter never left its initialization (every LoRA B is still zero): no update "
                        "reached it; check the learning rate, the data (supervised tokens), and for RL the rewards")

    def adapter_export_dir(self) -> str:
        if self.hparams.adapter_dir:
            return self.hparams.adapter_dir
        ckpt = self.trainer.checkpoint_callback
        base = ckpt.dirpath if ckpt is not None and ckpt.dirpath else (self.trainer.log_dir or ".")
        return str(Path(base) / "adapter")


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradients became NaN or infinite: training stops, nothing is exported."""


def check_finite(first_bad_step: int, grad_norm_value: float, step: int, lr: float, dtype: str, precision) -> None:
    """Stop a run whose loss or gradient norm stopped being finite, naming the step and the settings that usually
    cause it (read on logging steps only: the flag stays on the device in between)."""
    import math

    if first_bad_step < 0 and math.isfinite(grad_norm_value):
        return
    what = (f"the loss was non-finite at optimizer step {first_bad_step}" if first_bad_step >= 0 else
            f"the gradient norm is non-finite at optimizer step {step}")
    raise NonFiniteTrainingError(
        f"{what} (seen at step {step}): training stops and no adapter is exported (checkpoints from that step on hold "
        f"non-finite weights). Usual causes: the learning rate (optim.lr={lr:g}), the precision (trainer.precision="
        f"{precision}, model.compute_dtype={dtype}), or attention that computes NaN on this device")


def json_safe(value: Any) -> Any:
    """Settings as JSON can hold them (dataclasses as dicts, anything else as its text)."""
    from dataclasses import is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return json_safe(asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


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
    if step == schedule["total"]:  # a run stopped after its last step: finish it (export), train nothing
        log.info("the checkpoint is at the last step of its schedule (%d): nothing is left to train; finishing the "
                 "run (its adapter is exported)", step)
        return
    if step > schedule["total"]:
        raise ValueError(f"the checkpoint is at optimizer step {step} and this run's schedule ends at step "
                         f"{schedule['total']}: nothing is left to train. Raise trainer.max_steps/max_epochs to "
                         "continue it, or evaluate the checkpoint (a fresh run: `fit --overwrite true`; a multistep "
                         "stage: --on_change retrain)")
    if before and before != schedule:
        log.warning("resuming at step %d of a schedule planned for %d steps (%d warmup); this run plans %d (%d "
                    "warmup): from here the learning rate follows the new schedule (%.3g now, not the old %.3g)",
                    step, before["total"], before["warmup"], schedule["total"], schedule["warmup"],
                    lr * warmup_cosine(schedule["warmup"], schedule["total"], min_ratio)(step),
                    lr * warmup_cosine(before["warmup"], before["total"], min_ratio)(step))


def rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
