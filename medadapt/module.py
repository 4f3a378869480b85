"""CausalLMModule: the LightningModule of next-token training (SFT, continual pretraining) and of the test stage.

It stands on the shared training core (``training.AdapterModule``: model, optimizer, checkpoints, export); GRPO has
its own module on the same core (``rl/module.py``).

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
from typing import Optional

import torch

from medadapt.attention import VARLEN, flex_bucket
from medadapt.checkpoints import load_checkpoint
from medadapt.eval.stage import TestStage
from medadapt.loss import chunked_cross_entropy
from medadapt.model import unwrapped
from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.optim import OptimConfig
from medadapt.training import AdapterModule, check_finite, grad_norm, rank_zero

log = logging.getLogger(__name__)

#: attention implementations that take the packed batch's segment boundaries instead of a mask
VARLEN_KERNELS = (VARLEN, "flash_attention_2")


class CausalLMModule(TestStage, AdapterModule):
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
        super().__init__(model, lora, optim, adapter_dir, init_adapter)
        self.save_hyperparameters({**self.shared_hparams(model, lora, optim, adapter_dir, init_adapter),
                                   "results_dir": results_dir})
        self._step_stats: Optional[torch.Tensor] = None  # on device: summed over the micro-batches of a step
        self._step_started: Optional[float] = None
        #: tokens one micro-batch holds at most (rows x max_length), told by the run (``cli``); null: the first
        #: batch's size. What ``gradient_checkpointing: auto`` sizes its decision by.
        self.micro_batch_tokens: Optional[int] = None
        self._checkpointing_pending = self._compile_pending = False
        self._first_nonfinite: Optional[torch.Tensor] = None  # on device: the first step whose loss was NaN/inf

    def _load(self, cfg: ModelConfig, lora: Optional[LoraConfig], training: bool) -> None:
        from medadapt.model import is_compiled

        super()._load(cfg, lora, training)
        self._checkpointing_pending = training and self.resolved_model_cfg.gradient_checkpointing == "auto"
        self._compile_pending = training and self.resolved_model_cfg.compile == "auto" and is_compiled(self.model)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Varlen kernels take segment boundaries, not a rectangle: a packed training or validation batch goes as one
        row of its real tokens (``packing.flatten_packed``, on the CPU), so padding costs nothing."""
        if isinstance(batch, dict) and "segment_ids" in batch and self.model is not None:
            if unwrapped(self.model).config._attn_implementation in VARLEN_KERNELS:
                from medadapt.data.packing import flatten_packed

                return flatten_packed(batch)
        return batch

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
        return loss, torch.full((), batch["targets"].shape[0], dtype=torch.float64, device=loss.device)  # no H2D copy

    # ---- training --------------------------------------------------------------------------------
    #: per optimizer step, summed over micro-batches and ranks (kept on device until the step)
    STEP_STATS = ("tokens", "loss_sum", "padding", "positions", "examples", "nonfinite")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._compile_pending:
            self.settle_compile(batch)
        if self._checkpointing_pending:
            self.settle_checkpointing(batch)
        if self._step_started is None:
            self._step_started = time.perf_counter()
        loss, n = self.loss_sum(batch)
        segments = batch["segment_ids"]
        stats = torch.stack([n, loss.detach().double(), (segments == 0).sum().double(),
                             torch.full((), segments.numel(), dtype=torch.float64, device=segments.device),
                             segments.amax(dim=1).sum().double(),  # segments are numbered 1..k per row
                             (~torch.isfinite(loss.detach())).double()])
        self._step_stats = stats if self._step_stats is None else self._step_stats + stats
        # Lightning divides this by accumulate_grad_batches; on_before_optimizer_step undoes that.
        return loss

    def settle_compile(self, batch: dict[str, torch.Tensor]) -> None:
        """``model.compile: auto``: compile the layers on a short probe of the first batch (forward and backward, on
        its own RNG stream, gradients dropped); if that fails, go on eagerly and say why in one line."""
        from medadapt.model import uncompile_layers

        self._compile_pending = False
        n = int(min(64, batch["input_ids"].shape[1]))
        device = batch["input_ids"].device
        probe = {"input_ids": batch["input_ids"][:1, :n], "position_ids": torch.arange(n, device=device)[None],
                 "cu_seq_lens": torch.tensor([0, n], dtype=torch.int32).to(device, non_blocking=True),
                 "max_length": n}
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self(probe).float().sum().backward()
        except Exception as e:  # noqa: BLE001 (any compiler failure: the step runs eagerly)
            uncompile_layers(self.model)
            if rank_zero():
                log.warning("model.compile: auto: compiling the decoder layers failed (%s: %s); training eagerly",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        finally:
            for p in self.parameters():
                p.grad = None

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
        """Rescale the step's gradients to a token-weighted mean on the device (no host sync), and on logging steps
        only, read the step's figures and the gradient norm (one host sync)."""
        totals = self.trainer.strategy.reduce(self._step_stats, reduce_op="sum")
        # DDP averages gradients over ranks and Lightning divided each micro-batch loss by
        # accumulate_grad_batches: both factors come back, then divide by the step's token count.
        scale = (self.trainer.accumulate_grad_batches * self.trainer.world_size) / totals[0].clamp(min=1.0)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        step = self.trainer.global_step + 1  # this optimizer step's number, as in the checkpoint names
        self.last_step_loss = totals[1] / totals[0].clamp(min=1.0)  # a device tensor: read it when needed
        self._step_stats, started, self._step_started = None, self._step_started, None
        first = self._first_nonfinite if self._first_nonfinite is not None else torch.full_like(totals[5], -1.0)
        self._first_nonfinite = torch.where((totals[5] > 0) & (first < 0), torch.full_like(first, step), first)
        if not (step == 1 or step % max(self.trainer.log_every_n_steps, 1) == 0):
            return
        tokens, loss_sum, padding, positions, examples, _ = totals.tolist()
        metrics = {"train/grad_norm": grad_norm(grads)} if grads else {}
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16: overflowing steps are the scaler's
        check_finite(int(self._first_nonfinite), 0.0 if scaler is not None else metrics.get("train/grad_norm", 0.0),
                     step, self.optim_cfg.lr, self.resolved_model_cfg.compute_dtype, self.trainer.precision)
        elapsed = time.perf_counter() - (started or time.perf_counter())
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
        self.log_at_step(metrics, step)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)

    # ---- validation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self.loss_sum(batch)
        self._val_sums += torch.stack([loss.double(), n.double()])

    def on_validation_epoch_end(self) -> None:
        """Token-weighted over the whole validation set and every rank (plain sums: no state to leak
        between inference-mode and no-grad runs, which a torchmetrics state tensor would)."""
        loss_sum, tokens = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if tokens:
            in_fit = self.trainer.state.fn == "fit"
            self.log("val/loss", loss_sum / tokens, prog_bar=True, rank_zero_only=True, logger=not in_fit)
            if in_fit:  # after N optimizer steps: logged at step N, beside that step's train/loss
                self.log_at_step({"val/loss": loss_sum / tokens}, self.trainer.global_step)

    # ---- test: the leaderboard benchmarks live in eval/stage.py (TestStage) -----------------------------
    def teardown(self, stage: str) -> None:
        self.on_test_end()  # also after a failed run: the folder is free again


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

