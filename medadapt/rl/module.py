"""GRPOModule: reinforcement learning with verifiable rewards after SFT, on the shared training core.

One training step is one rollout batch (each rank: ``data.batch_size`` questions × ``rl.group_size`` completions):

1. **Sample** from the current policy (``rl/sampler.py``: HF or a vLLM engine), **reward** with the test stage's
   reader (``rl/rollout.py``), group advantages (``rl/grpo.py``). With dynamic sampling, batches without enough
   signal are topped up from the next ones before any update.
2. **Choose what enters the loss**: groups whose rewards are all equal leave it (``no_signal: drop``), truncated
   completions too (``truncation: mask``); the rest are sorted by length into micro-batches of
   ``rl.micro_batch_size`` completions.
3. **Score without gradients** what the update needs: π_old (μ > 1, or vLLM rollouts' importance weights) and the
   reference (β > 0: the policy with its own LoRA off, i.e. base + frozen SFT), in micro-batches, chunked over the
   vocabulary (``rl/scoring.py``).
4. **Update μ times**: every micro-batch's summed loss is back-propagated divided by the step's global normaliser
   (its loss tokens, completions, or completions × budget over every rank), gradients synchronised once per
   optimizer step, clipped (``rl.max_grad_norm``), stepped, the schedule advanced.

The module steps its optimizer itself (Lightning's manual optimization): ``trainer.accumulate_grad_batches`` and
``trainer.gradient_clip_val`` have no meaning here and are refused (``check_trainer``). Validation answers held-out
questions with the test stage's generative protocol (sampling, budget forcing). TensorBoard ``rl/*``: reward mean
and spread, the share of groups with no signal, entropy, KL, clipped fractions, truncation rate, completion length
(all, right, wrong), generation and update seconds, rollout tokens/s.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from typing import Optional

import torch

from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.optim import OptimConfig
from medadapt.provenance import read_adapter_metadata
from medadapt.rl.grpo import GRPOConfig, group_advantages, grpo_terms, importance_weights, normaliser
from medadapt.rl.rollout import Clock, Completion, Sampling, reward
from medadapt.rl.sampler import PolicySampler
from medadapt.rl.scoring import collate_scoring, completion_logprobs, reference_policy, to_device
from medadapt.training import AdapterModule, NonFiniteTrainingError, grad_norm, rank_zero

log = logging.getLogger(__name__)

#: consecutive rollout batches with nothing to learn from before the run stops and says why
MAX_EMPTY_STEPS = 10


class RLSetupError(ValueError):
    """An RL configuration that would train something other than it says."""


class GRPOModule(AdapterModule):
    """GRPO on a fresh LoRA over a (4-bit) base with the SFT adapter stacked under it, frozen.

    Args:
        model: Base model and the adapters stacked under the RL LoRA (``base_adapters``: the SFT adapter); the
            reference policy is exactly that stack.
        lora: The RL LoRA (dropout must be 0: the policy is scored as it sampled; no ``modules_to_save``: the
            reference switches LoRA layers off, and trained copies of whole modules would stay on).
        optim: Optimizer and learning-rate schedule (the schedule counts optimizer steps: μ per rollout batch).
        adapter_dir: Where the final adapter is exported; null: ``<checkpoint dir>/adapter``.
        init_adapter: An RL adapter to continue training (its metadata must say it was trained by RL: an SFT adapter
            here would itself be trained and the reference would lose it; stack it with ``model.base_adapters``).
        rl: The GRPO settings (``rl/grpo.py``: ``GRPOConfig``).
    """

    METHOD = "rl"

    def __init__(self, model: ModelConfig = ModelConfig(),
                 lora: Optional[LoraConfig] = LoraConfig(dropout=0.0),
                 optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0, warmup_steps=10, min_lr_ratio=1.0),
                 adapter_dir: Optional[str] = None, init_adapter: Optional[str] = None,
                 rl: GRPOConfig = GRPOConfig()):
        super().__init__(model, lora, optim, adapter_dir, init_adapter)
        self.rl_cfg = GRPOConfig(**rl) if isinstance(rl, dict) else rl
        self.save_hyperparameters({**self.shared_hparams(model, lora, optim, adapter_dir, init_adapter),
                                   "rl": asdict(self.rl_cfg)})
        self.automatic_optimization = False
        check_rl_setup(lora, init_adapter, model)
        self.sampler = PolicySampler(self)
        self.max_prompt_tokens: Optional[int] = None  # the data's prompt budget, told by the run (``cli``)
        self._pending: list[tuple] = []  # dynamic sampling: groups with signal waiting for a full batch
        self._pending_stats: Optional[dict] = None
        self._refills = 0
        self._empty_steps = 0

    # ---- setup -------------------------------------------------------------------------------------
    def model_config_for(self, cfg: ModelConfig) -> ModelConfig:
        if cfg.attn_implementation in ("auto", "varlen"):  # padded prompt + completion rows, not packed ones
            cfg = replace(cfg, attn_implementation="sdpa")
        if cfg.compile == "auto":  # generation calls the layers at a new length every token: recompiles
            cfg = replace(cfg, compile=False)
        return cfg

    def check_trainer(self, trainer) -> None:
        """Settings Lightning honours only when it steps the optimizer itself, named with what replaces them."""
        if trainer.gradient_clip_val:
            raise RLSetupError(f"trainer.gradient_clip_val={trainer.gradient_clip_val}: GRPO steps its optimizer itself "
                               "(μ updates per rollout batch); clip with model.rl.max_grad_norm instead")
        if trainer.accumulate_grad_batches != 1:
            raise RLSetupError("trainer.accumulate_grad_batches must be 1 for GRPO: one step already spans its whole "
                               "rollout batch in micro-batches (model.rl.micro_batch_size); raise data.batch_size for "
                               "more questions per step")

    def planned_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return max(int(self.trainer.estimated_stepping_batches) * self.rl_cfg.updates_per_batch, 1)

    def gradient_clipping(self) -> Optional[float]:
        return self.rl_cfg.max_grad_norm

    @property
    def rl_max_model_len(self) -> int:
        """The longest sequence an RL rollout engine must hold: the prompt budget plus completion and forcing."""
        cfg = self.rl_cfg
        longest = max(cfg.max_new_tokens, cfg.validation.max_new_tokens,
                      (cfg.pass_rate_filter.max_new_tokens or 0) if cfg.pass_rate_filter else 0)
        return int(self.max_prompt_tokens or 2048) + longest + max(cfg.answer_budget, cfg.validation.answer_budget) + 16

    #: settings that change what is optimised; the rest (backend, engine, validation) may change on a resume
    OBJECTIVE = ("group_size", "max_new_tokens", "temperature", "top_p", "top_k", "beta", "kl_ratio_weight",
                 "clip_eps", "clip_eps_high", "scale_rewards", "averaging", "no_signal", "dynamic_sampling",
                 "updates_per_batch", "truncation", "answer_budget", "importance_sampling", "importance_sampling_cap",
                 "format_reward", "std_eps")

    def recipe(self) -> dict:
        return {**super().recipe(), "rl": asdict(self.rl_cfg)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["medadapt"]["objective"] = {k: getattr(self.rl_cfg, k) for k in self.OBJECTIVE}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resume optimises what the checkpoint optimised: another group size, β, temperature, normalisation… would
        splice two objectives into one run and report it as one."""
        super().on_load_checkpoint(checkpoint)
        recorded = (checkpoint.get("medadapt") or {}).get("objective")
        if recorded:
            changed = {k: (v, getattr(self.rl_cfg, k)) for k, v in recorded.items()
                       if k in self.OBJECTIVE and getattr(self.rl_cfg, k) != v}
            if changed:
                raise RLSetupError("resuming with another objective than the checkpoint was trained with: "
                                   + ", ".join(f"rl.{k} {old!r} → {new!r}" for k, (old, new) in changed.items())
                                   + "; resume with the checkpoint's settings, or start a new run")

    def on_fit_start(self) -> None:
        if self.rl_cfg.pass_rate_filter is not None and self.trainer.datamodule is not None:
            from medadapt.rl.passrate import filter_by_pass_rate

            filter_by_pass_rate(self, self.trainer.datamodule)

    def teardown(self, stage: str) -> None:
        self.sampler.close()

    # ---- the step ------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        cfg, clock = self.rl_cfg, Clock(self.device)
        started = time.perf_counter()
        rows = batch["gen_rows"]
        with clock.phase("generation"):
            completions = self.sampler.sample(rows, cfg.group_size, Sampling.of(cfg))
        reward(completions, rows, self.tokenizer, cfg)
        groups = [(row, completions[i * cfg.group_size : (i + 1) * cfg.group_size]) for i, row in enumerate(rows)]
        stats = rollout_stats(completions, groups, self.device)
        stats["generation_s"] += clock.seconds["generation"]
        if cfg.dynamic_sampling:
            groups, stats = self.top_up(groups, stats, len(rows))
            if groups is None:
                return  # not enough signal yet: the next batch adds its groups before any update
        self.update(groups, stats, clock, started)

    def top_up(self, groups: list, stats: dict, wanted: int) -> tuple[Optional[list], dict]:
        """DAPO's dynamic sampling: keep the groups with signal until ``wanted`` of them are there on every rank (or
        ``max_refills`` more batches were drawn); the surplus is dropped, as DAPO does."""
        self._pending += [g for g in groups if has_signal(g[1])]
        self._pending_stats = stats if self._pending_stats is None else {
            k: self._pending_stats[k] + v for k, v in stats.items()}
        self._refills += 1
        ready = torch.tensor(float(len(self._pending) >= wanted or self._refills > self.rl_cfg.max_refills),
                             device=self.device)
        if self.trainer.strategy.reduce(ready, reduce_op="min") < 1:  # every rank steps together
            return None, stats
        groups, stats = self._pending[:wanted], self._pending_stats
        stats["refills"] = torch.tensor(float(self._refills - 1), device=self.device)
        self._pending, self._pending_stats, self._refills = [], None, 0
        return groups, stats

    def update(self, groups: list, stats: dict, clock: Clock, started: float) -> None:
        cfg, strategy = self.rl_cfg, self.trainer.strategy
        world = self.trainer.world_size
        rewards = torch.tensor([[c.reward for c in g] for _, g in groups], dtype=torch.float32).view(-1, cfg.group_size)
        batch_std = self.global_std(rewards) if cfg.scale_rewards == "batch" else None
        advantages = group_advantages(rewards, cfg.scale_rewards, cfg.std_eps, batch_std) if len(groups) else rewards
        if not bool(torch.isfinite(advantages).all()):
            raise NonFiniteTrainingError(f"step {self.trainer.global_step + 1}: non-finite advantages (rewards "
                                         f"{rewards.flatten().tolist()[:8]}…, rl.std_eps={cfg.std_eps}, "
                                         f"rl.scale_rewards={cfg.scale_rewards}, rl.format_reward={cfg.format_reward})")
        scored: list[tuple[Completion, float]] = []
        for (row, group), adv in zip(groups, advantages.tolist()):
            if cfg.no_signal == "drop" and not has_signal(group):
                continue
            scored += [(c, a) for c, a in zip(group, adv) if not (cfg.truncation == "mask" and c.truncated)]
        scored.sort(key=lambda ca: -(len(ca[0].prompt) + len(ca[0].ids)))
        micro = [scored[i : i + cfg.micro_batch_size] for i in range(0, len(scored), cfg.micro_batch_size)]
        batches = [self.scoring_batch(part) for part in micro]
        counts = torch.tensor([float(sum(sum(c.sampled) for c, _ in scored)), float(len(scored))], device=self.device)
        tokens, sequences = strategy.reduce(counts, reduce_op="sum").tolist()
        norm = normaliser(cfg, tokens, sequences)
        self._empty_steps = 0 if tokens > 0 else self._empty_steps + 1
        with clock.phase("scoring"), torch.no_grad():
            need_old = cfg.updates_per_batch > 1 or (cfg.backend == "vllm" and cfg.importance_sampling != "off")
            old = [completion_logprobs(self.model, b, cfg.temperature)[0] for b in batches] if need_old else None
            ref = None
            if cfg.beta > 0:
                with reference_policy(self.model):
                    ref = [completion_logprobs(self.model, b, cfg.temperature)[0] for b in batches]
            weights = None
            if cfg.backend == "vllm" and cfg.importance_sampling != "off":
                weights = [importance_weights(o, b["sampler_logp"], b["score_mask"], cfg.importance_sampling,
                                              cfg.importance_sampling_cap) for o, b in zip(old, batches)]
                stats.update(is_weight_stats(weights, batches, cfg.importance_sampling_cap, self.device))
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        with clock.phase("update"):
            for iteration in range(cfg.updates_per_batch):
                sums = backprop(self.model, batches, cfg, norm, world, old, ref, weights, self.manual_backward,
                                lambda: no_backward_sync(strategy), with_entropy=iteration == 0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                for k, v in sums.items():
                    stats[k] = stats.get(k, 0) + v
                if not bool(torch.isfinite(sums["loss"])):  # one sync per update: an RL step is long
                    raise NonFiniteTrainingError(
                        f"step {self.trainer.global_step}: the GRPO loss is non-finite; training stops and no adapter "
                        f"is exported. Settings that cause it: rl.temperature={cfg.temperature} (log-probabilities "
                        f"of logits / T), rl.beta={cfg.beta}, optim.lr={self.optim_cfg.lr:g}, trainer.precision="
                        f"{self.trainer.precision}")
        stats["update_s"] = torch.tensor(clock.seconds["update"] + clock.seconds["scoring"], device=self.device)
        stats["step_s"] = torch.tensor(time.perf_counter() - started, device=self.device)
        self.log_step(stats, norm)
        if self._empty_steps >= MAX_EMPTY_STEPS:
            raise RuntimeError(
                f"{self._empty_steps} rollout batches in a row had nothing to learn from: every group's rewards were "
                "equal (or every completion was truncated and masked). Check rl.temperature (too low samples the same "
                "answer G times), rl.max_new_tokens against the completion lengths, and the rewards; "
                "rl.dynamic_sampling: true draws more questions until a batch has signal")

    def scoring_batch(self, part: list[tuple[Completion, float]]) -> dict:
        """A micro-batch's tensors on the device: ids, masks, scored positions, advantages, sampler log-probs."""
        completions = [c for c, _ in part]
        batch = collate_scoring([c.prompt for c in completions], [c.ids for c in completions],
                                [c.sampled for c in completions], self.tokenizer.pad_token_id,
                                [c.sampler_logp for c in completions])
        batch["advantages"] = torch.tensor([a for _, a in part], dtype=torch.float32)
        return to_device(batch, self.device)

    def global_std(self, rewards: torch.Tensor) -> torch.Tensor:
        """The std (Bessel) of every reward of the step, over every rank (``scale_rewards: batch``, as TRL)."""
        flat = rewards.flatten().double().to(self.device)
        n, s, sq = self.trainer.strategy.reduce(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(),
                                                             (flat * flat).sum()]), reduce_op="sum").tolist()
        return torch.tensor(max((sq - s * s / n) / max(n - 1, 1), 0.0) ** 0.5 if n else 0.0)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients here are unscaled (fp16) and synchronised: measure their norm, then clip."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self._grad_norm = grad_norm(grads) if grads else 0.0
        if self.rl_cfg.max_grad_norm:
            self.configure_gradient_clipping(optimizer, self.rl_cfg.max_grad_norm, "norm")

    # ---- logs ------------------------------------------------------------------------------------------
    def log_step(self, stats: dict, norm: float) -> None:
        """The step's figures, summed over ranks (one host sync), to every logger at the step they belong to."""
        keys = sorted(stats)
        totals = dict(zip(keys, self.trainer.strategy.reduce(
            torch.stack([stats[k].float().reshape(()) for k in keys]), reduce_op="sum").tolist()))
        world = self.trainer.world_size
        n, groups = max(totals["completions"], 1.0), max(totals["groups"], 1.0)
        metrics = {
            "rl/reward_mean": totals["reward_sum"] / n,
            "rl/reward_std": totals["group_std_sum"] / groups,
            "rl/no_signal_groups": totals["no_signal"] / groups,
            "rl/kl": totals["kl_sum"] / max(totals["loss_tokens"], 1.0),
            "rl/entropy": totals["entropy_sum"] / max(totals["entropy_tokens"], 1.0),
            "rl/clipped_fraction_low": totals["clipped_low"] / max(totals["loss_tokens"], 1.0),
            "rl/clipped_fraction_high": totals["clipped_high"] / max(totals["loss_tokens"], 1.0),
            "rl/truncated": totals["truncated"] / n,
            "rl/forced": totals["forced"] / n,
            "rl/unparsable": totals["unparsable"] / n,
            "rl/completion_length": totals["length_sum"] / n,
            "rl/completion_length_right": totals["length_right"] / max(totals["right"], 1.0),
            "rl/completion_length_wrong": totals["length_wrong"] / max(n - totals["right"], 1.0),
            "rl/loss_tokens": totals["loss_tokens"] / self.rl_cfg.updates_per_batch,
            "rl/generation_s": totals["generation_s"] / world,
            "rl/update_s": totals["update_s"] / world,
            "rl/step_s": totals["step_s"] / world,
            "rl/rollout_tokens_per_s": totals["length_sum"] / max(totals["generation_s"] / world, 1e-9),
            "train/loss": totals["loss"] / self.rl_cfg.updates_per_batch,
            "train/grad_norm": getattr(self, "_grad_norm", 0.0),
            "train/lr": self.optimizers().param_groups[0]["lr"],
        }
        if "refills" in totals:
            metrics["rl/refills"] = totals["refills"] / world
        if "is_weight_sum" in totals:
            metrics["rl/importance_weight"] = totals["is_weight_sum"] / max(totals["is_tokens"], 1.0)
            metrics["rl/importance_weight_capped"] = totals["is_capped"] / max(totals["is_tokens"], 1.0)
        step = self.trainer.global_step  # after this rollout's μ optimizer steps
        rollout = step // self.rl_cfg.updates_per_batch
        if rollout == 1 or rollout % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log_at_step(metrics, step)
        if totals["loss_tokens"] == 0 and rank_zero():
            log.warning("step %d: no completion entered the loss (%d of %d groups without signal, %d truncated): no "
                        "update", step, totals["no_signal"], totals["groups"], totals["truncated"])
        self.log("reward", metrics["rl/reward_mean"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.last_step_loss, self.last_rl_stats = metrics["train/loss"], metrics

    # ---- validation: the held-out questions, as the test stage asks them -------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(5, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        v = self.rl_cfg.validation
        rows = batch["gen_rows"]
        sampling = Sampling(v.temperature, v.top_p, v.top_k, v.max_new_tokens, v.answer_budget)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training draws stay those of an unvalidated run
            completions = self.sampler.sample(rows, v.samples, sampling, seed=v.seed + batch_idx)
        reward(completions, rows, self.tokenizer, self.rl_cfg)
        right = sum(c.pred == rows[c.question].item.gold for c in completions)
        self._val_sums += torch.tensor([right, len(completions), sum(c.pred is None for c in completions),
                                        sum(c.forced for c in completions), sum(len(c.ids) for c in completions)],
                                       dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        right, replies, unparsable, forced, tokens = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum").tolist()
        if not replies:
            return
        metrics = {"val/heldout_acc": right / replies, "val/unparsable": unparsable / replies,
                   "val/forced": forced / replies, "val/reply_tokens": tokens / replies}
        self.log("val/heldout_acc", metrics["val/heldout_acc"], prog_bar=True, rank_zero_only=True, logger=False)
        self.log_at_step(metrics, self.trainer.global_step)


def backprop(model, batches: list[dict], cfg: GRPOConfig, norm: float, world: int, old: Optional[list] = None,
             ref: Optional[list] = None, weights: Optional[list] = None, backward=None, no_sync=None,
             with_entropy: bool = False) -> dict[str, torch.Tensor]:
    """One pass over a rollout's micro-batches: each scored with gradients and its summed loss back-propagated divided
    by the step's global normaliser (× the world size, which DDP's gradient average divides out again), so the
    accumulated gradient is the whole step's whatever the micro-batching and the number of ranks. Gradients are
    synchronised only on the last backward (``no_sync`` around the others). ``old``/``ref``/``weights``: per
    micro-batch π_old and reference log-probabilities and importance weights (null: π_old = π_θ detached, no KL, no
    weights). Returns detached sums for the logs."""
    backward = backward or (lambda loss: loss.backward())
    device = next(p.device for p in model.parameters())
    sums = {k: torch.zeros((), device=device) for k in ("loss", "kl_sum", "clipped_low", "clipped_high",
                                                        "loss_tokens", "entropy_sum", "entropy_tokens")}
    for j, b in enumerate(batches):
        with nullcontext() if j == len(batches) - 1 or no_sync is None else no_sync():
            logp, entropy = completion_logprobs(model, b, cfg.temperature, with_entropy=with_entropy)
            total, terms = grpo_terms(logp, old[j] if old else logp.detach(), ref[j] if ref else None,
                                      b["advantages"], b["score_mask"], cfg, weights[j] if weights else None)
            backward(total * world / norm)
        sums["loss"] += total.detach() / norm
        for k in ("kl_sum", "clipped_low", "clipped_high", "loss_tokens"):
            sums[k] += terms[k]
        if with_entropy:
            sums["entropy_sum"] += entropy
            sums["entropy_tokens"] += terms["loss_tokens"]
    if not batches:  # nothing to learn here: a zero gradient still meets the other ranks' all-reduce
        backward(sum((p * 0).sum() for p in model.parameters() if p.requires_grad))
    return sums


def check_rl_setup(lora: Optional[LoraConfig], init_adapter: Optional[str], model: ModelConfig) -> None:
    """Refuse what would make the reference (or the scored policy) something else than the run says."""
    if lora is not None and lora.modules_to_save:
        raise RLSetupError(f"lora.modules_to_save={lora.modules_to_save}: the reference switches the RL LoRA's layers "
                           "off, but trained copies of whole modules would stay on in it; train LoRA layers only "
                           "(modules_to_save: null)")
    if lora is not None and lora.dropout:
        raise RLSetupError(f"lora.dropout={lora.dropout}: the policy is scored in training mode, where dropout would "
                           "make the scored distribution differ from the one the rollouts were sampled from; set 0")
    if init_adapter:
        meta = read_adapter_metadata(init_adapter)
        method = meta.get("method") or ("unknown: no medadapt metadata" if meta.get("foreign") else "sft")
        if method != "rl":
            stack = [*(model.base_adapters or [])]
            raise RLSetupError(
                f"model.init_adapter {init_adapter} was trained by {method}, not RL: RL would train that adapter itself, "
                f"and the reference (the model with it off) would be {model.name_or_path} + {stack or 'no adapter'}, "
                f"not the policy RL starts from. To run RL after SFT, stack it under a fresh LoRA: "
                f"model.model.base_adapters: [{init_adapter}] and model.init_adapter: null")
    if lora is None and not init_adapter:
        raise RLSetupError("lora: null trains nothing: GRPO trains a LoRA (give lora settings, or an RL init_adapter)")


def has_signal(group: list[Completion]) -> bool:
    return max(c.reward for c in group) != min(c.reward for c in group)


def rollout_stats(completions: list[Completion], groups: list, device) -> dict:
    """Per-rank sums describing what was sampled (every completion, in the loss or not)."""
    right = [c for c in completions if c.right]
    wrong = [c for c in completions if not c.right]
    values = {
        "completions": len(completions), "groups": len(groups), "reward_sum": sum(c.reward for c in completions),
        "group_std_sum": sum(torch.tensor([c.reward for c in g]).std().item() for _, g in groups),
        "no_signal": sum(not has_signal(g) for _, g in groups), "truncated": sum(c.truncated for c in completions),
        "forced": sum(c.forced for c in completions), "unparsable": sum(c.pred is None for c in completions),
        "length_sum": sum(sum(c.sampled) for c in completions), "right": len(right),
        "length_right": sum(sum(c.sampled) for c in right), "length_wrong": sum(sum(c.sampled) for c in wrong),
        "generation_s": 0.0,
    }
    return {k: torch.tensor(float(v), device=device) for k, v in values.items()}


def is_weight_stats(weights: list[torch.Tensor], batches: list[dict], cap: float, device) -> dict:
    """Sums for the logs: the importance weights of scored tokens, and how many hit the cap (truncated at it, or
    masked to 0 above it)."""
    total, capped, tokens = (torch.zeros((), device=device) for _ in range(3))
    for w, b in zip(weights, batches):
        mask = b["score_mask"].to(w.dtype)
        total += (w * mask).sum()
        capped += ((w == 0) | (w >= cap)).to(w.dtype).mul(mask).sum()
        tokens += mask.sum()
    return {"is_weight_sum": total, "is_capped": capped, "is_tokens": tokens}


def no_backward_sync(strategy):
    """Gradients accumulate locally until the step's last backward (DDP: one all-reduce per optimizer step)."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else nullcontext()
