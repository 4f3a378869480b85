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
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F

from medadapt.data.packing import IGNORE_INDEX, block_causal_mask
from medadapt.model import LoraConfig, ModelConfig, load_model, load_tokenizer

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
        min_lr_ratio: Floor of the cosine as a fraction of ``lr``.
        fused: Use the fused AdamW kernel where the device supports it (CUDA).
        embedding_lr: Separate learning rate for fully trained embeddings / LM head (listed in
            ``lora.modules_to_save``); null uses ``lr``. Continual pretraining typically uses lr/10.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 300
    min_lr_ratio: float = 0.0
    fused: bool = True
    embedding_lr: Optional[float] = None


class CausalLMModule(L.LightningModule):
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
    """

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        lora: Optional[LoraConfig] = LoraConfig(),
        optim: OptimConfig = OptimConfig(),
        adapter_dir: Optional[str] = None,
        init_adapter: Optional[str] = None,
        results_dir: str = "results/run",
    ):
        super().__init__()
        # Plain dicts, not dataclasses: checkpoints then load with torch.load(weights_only=True).
        self.save_hyperparameters({"model": asdict(model), "lora": asdict(lora) if lora else None,
                                   "optim": asdict(optim), "adapter_dir": adapter_dir, "init_adapter": init_adapter,
                                   "results_dir": results_dir})
        self.model_cfg, self.lora_cfg, self.optim_cfg = model, lora, optim
        self.tokenizer = load_tokenizer(model)
        self.model = None
        self.strict_loading = False  # checkpoints hold only trainable tensors; the base is rebuilt
        self._step_tokens = 0
        self._step_loss = 0.0
        self._step_padding = 0
        self._step_positions = 0
        self._step_started: Optional[float] = None

    # ---- model -----------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        lora = None if self.init_adapter_path else self.lora_cfg
        training = not getattr(self, "_inference", False) and (self._trainer is None
                                                                or self.trainer.state.fn in ("fit", None))
        self.model = load_model(self.model_cfg, lora, training=training)
        if self.init_adapter_path:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, self.init_adapter_path, is_trainable=training)
        if self.lora_cfg is not None and rank_zero():
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.model.parameters())
            log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    @property
    def init_adapter_path(self) -> Optional[str]:
        return self.hparams.init_adapter

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            dtype = torch.float32
        mask = block_causal_mask(batch["segment_ids"], dtype)
        out = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask,
                         use_cache=False)
        return out.logits

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over supervised tokens, and their count."""
        logits = self(batch)[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((targets != IGNORE_INDEX).sum())

    # ---- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._step_started is None:
            self._step_started = time.perf_counter()
        loss, n = self.loss_sum(batch)
        self._step_tokens += n
        self._step_loss += float(loss.detach())
        self._step_padding += int((batch["segment_ids"] == 0).sum())
        self._step_positions += batch["segment_ids"].numel()
        # Lightning divides this by accumulate_grad_batches; on_before_optimizer_step undoes that.
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        totals = torch.tensor([self._step_tokens, self._step_loss, self._step_padding, self._step_positions],
                              dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        tokens, loss_sum, padding, positions = totals.tolist()
        # DDP averages gradients over ranks and Lightning divided each micro-batch loss by
        # accumulate_grad_batches: both factors come back, then divide by the step's token count.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(tokens, 1.0)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        self.log_dict(
            {
                "train/loss": loss_sum / max(tokens, 1.0),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/tokens_per_s": positions / elapsed if elapsed > 0 else 0.0,
                "train/supervised_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                "train/supervised_fraction": tokens / max(positions, 1.0),
                "train/padding_fraction": padding / max(positions, 1.0),
            },
            on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True, sync_dist=False,
        )
        self.log("loss", loss_sum / max(tokens, 1.0), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.last_step_loss = loss_sum / max(tokens, 1.0)
        self._step_tokens, self._step_loss, self._step_padding, self._step_positions = 0, 0.0, 0, 0
        self._step_started = None

    # ---- validation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = [0.0, 0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self.loss_sum(batch)
        self._val_sums[0] += float(loss)
        self._val_sums[1] += n

    def on_validation_epoch_end(self) -> None:
        """Token-weighted over the whole validation set and every rank (plain sums: no state to leak
        between inference-mode and no-grad runs, which a torchmetrics state tensor would)."""
        totals = torch.tensor(self._val_sums, dtype=torch.float64, device=self.device)
        loss_sum, tokens = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        if tokens:
            self.log("val/loss", loss_sum / tokens, prog_bar=True, rank_zero_only=True)

    # ---- test: leaderboard benchmarks -------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test_records: list[dict] = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        from medadapt.eval.scoring import decide, forward_rows, score_rows

        items = self.trainer.datamodule.items
        if "gen_rows" in batch:
            return self._generative_step(batch, items)
        for index, per_choice in score_rows(forward_rows(self.model, batch), batch["rows"]).items():
            item = items[index]
            lls = [per_choice[c][0] for c in range(len(item.choices))]
            self._test_records.append({"task": item.task, "id": item.id, "gold": item.gold, "loglikelihoods": lls,
                                       "is_greedy": [per_choice[c][1] for c in range(len(item.choices))],
                                       "n_choices": len(item.choices), **decide(item, lls), **item.extra})

    def _generative_step(self, batch: dict, items: list) -> None:
        from medadapt.eval.generative import decide_generated, generate

        budget = self.trainer.datamodule.hparams.max_new_tokens
        for row, (text, finished) in zip(batch["gen_rows"], generate(self.model, self.tokenizer, batch, budget)):
            item = items[row.item]
            self._test_records.append({"task": item.task, "id": item.id, "gold": item.gold, "loglikelihoods": None,
                                       "n_choices": len(item.choices),
                                       **decide_generated(item, text, finished, row.thinking), **item.extra})

    def on_test_epoch_end(self) -> None:
        from medadapt.eval.report import fingerprint, summarize, write_results

        records = self._test_records
        if self.trainer.world_size > 1:
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        keys = [(r["task"], r["id"]) for r in records]
        if len(set(keys)) != len(keys):
            raise RuntimeError("an item was scored twice; the test sampler must not pad")
        summary = summarize(records)
        for task, m in summary["tasks"].items():
            self.log_dict({f"test/{task}/acc": m["acc"], f"test/{task}/acc_norm": m["acc_norm"],
                           f"test/{task}/unparsable": float(m["unparsable"])}, rank_zero_only=True)
        self.log("test/macro_avg_acc", summary["macro_avg_acc"], rank_zero_only=True)
        if self.trainer.is_global_zero:
            dm = self.trainer.datamodule
            meta = {"model": self.hparams.model, "lora": self.hparams.lora, "adapter": self.init_adapter_path,
                    "ckpt_path": self.trainer.ckpt_path, "data": dict(dm.hparams),
                    "data_fingerprint": fingerprint(dm.items)}
            path = write_results(self.hparams.results_dir, summary, records, meta)
            log.info("results: %s (macro acc %.4f over %d items)", path, summary["macro_avg_acc"], summary["n"])

    # ---- optimizer ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay, embeds = [], [], []
        save_names = tuple(self.lora_cfg.modules_to_save or []) if self.lora_cfg else ()
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
        fused = cfg.fused and all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors (a 4-bit base cannot be reloaded from a state dict anyway) and
        every rank's RNG state, so LoRA dropout after a resume draws the masks it would have drawn."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng"] = {"cpu": self._gather_rng(torch.get_rng_state())}
        if torch.cuda.is_available() and self.device.type == "cuda":
            checkpoint["rng"]["cuda"] = self._gather_rng(torch.cuda.get_rng_state(self.device))

    def _gather_rng(self, state: torch.Tensor) -> torch.Tensor:
        gathered = self.all_gather(state.to(self.device))  # dump_checkpoint runs on every rank
        return (gathered if self.trainer.world_size > 1 else gathered[None]).cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = expected - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}; "
                               "was it written with another LoRA configuration?")
        self._resumed_rng = checkpoint.get("rng")

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
        if self.lora_cfg is None and not self.init_adapter_path:
            return
        path = self.adapter_export_dir()
        if self.trainer.is_global_zero:
            self.model.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            log.info("exported PEFT adapter to %s", path)
        self.trainer.strategy.barrier()

    def adapter_export_dir(self) -> str:
        if self.hparams.adapter_dir:
            return self.hparams.adapter_dir
        ckpt = self.trainer.checkpoint_callback
        base = ckpt.dirpath if ckpt is not None and ckpt.dirpath else (self.trainer.log_dir or ".")
        return str(Path(base) / "adapter")


def load_for_inference(model: ModelConfig, lora: Optional[LoraConfig] = None, init_adapter: Optional[str] = None,
                       ckpt_path: Optional[str] = None) -> CausalLMModule:
    """The module with its weights ready to generate outside a Trainer (``ask``): base model, an
    exported PEFT adapter, or a LoRA checkpoint of a fit run (``lora`` must match it)."""
    module = CausalLMModule(model=model, lora=lora if ckpt_path else None, init_adapter=init_adapter)
    module._inference = True
    module.configure_model()
    if ckpt_path:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.model.eval()
    if torch.cuda.is_available() and not model.load_in_4bit:
        module.model.cuda()
    return module


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0
