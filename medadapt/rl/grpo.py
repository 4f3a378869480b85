"""GRPO: the settings and the objective, written so that each can be checked against the papers and against TRL.

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath §4.1; used for DeepSeek-R1). For each
question q, G completions o_1..o_G are sampled from the policy as it was when the rollout was drawn (π_old).
Each gets a reward r_i (1 when medadapt's answer reader reads the gold choice, else 0). Advantages are relative
to the group:

    scale_rewards: group   Â_i = (r_i − mean(r)) / (std(r) + ε)     (std with Bessel's correction, as TRL)
    scale_rewards: batch   Â_i = (r_i − mean(r)) / (std(r_batch) + ε)  (the step's std over every rank)
    scale_rewards: none    Â_i =  r_i − mean(r)                       (Dr. GRPO, Liu et al., 2025)

and every token t of o_i carries Â_i. With the ratio ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | …),
every log-probability taken of the logits divided by the sampling temperature (what the samples came from):

    L_{i,t} = −min(ρ Â_i, clip(ρ, 1 − ε_low, 1 + ε_high) Â_i) · w_{i,t} + β · KL_{i,t}
    KL_{i,t} = (π_ref/π_θ − log(π_ref/π_θ) − 1) · ρ      (Schulman's k3; × ρ: TRL's use_bias_correction_kl)

``w`` is the importance weight of vLLM rollouts (1 otherwise): the trainer's π_old over the sampler's own
probability, truncated or masked at ``importance_sampling_cap`` (Yao et al., 2025; TRL's
``vllm_importance_sampling_*``): vLLM's kernels do not reproduce the trainer's numbers, and the update must be
for the samples' real distribution.

**Normalisation over the whole step.** The loss of a step is a sum over every completion token of the rollout
batch — every micro-batch and every rank — divided by one number known before the first backward:

    averaging: token       the step's number of loss tokens (DAPO; TRL ``loss_type: dapo``)
    averaging: sequence    each completion's mean over its tokens, summed, / the step's completions (the GRPO
                           paper; TRL ``grpo`` when micro-batches hold equally many completions)
    averaging: constant    / (the step's completions × max_new_tokens) (Dr. GRPO; TRL ``dr_grpo``)

so micro-batching, gradient accumulation and DDP change nothing: N ranks × M micro-batches give the gradient of
one batch (``tests/rl/test_grpo.py``). A group whose rewards are all equal has Â = 0 everywhere and carries no
policy signal: with ``no_signal: drop`` (default) it leaves the loss and the normaliser (DAPO's filter), with
``keep`` its tokens stay in both (TRL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch


@dataclass
class HeldOutConfig:
    """How the held-out questions are answered during validation: the test stage's generative protocol (DeepSeek's:
    sampled at temperature 0.6, top-p 0.95, budget forcing), so ``val/heldout_acc`` measures what evaluation does.

    Args:
        temperature: Sampling temperature (0: greedy, which R1's card warns loops).
        top_p: Nucleus threshold.
        top_k: Top-k filter; 0 is off (DeepSeek's protocol has none).
        max_new_tokens: Thinking budget per reply.
        answer_budget: Budget forcing: a thought still open at ``max_new_tokens`` is closed and gets this many tokens
            to answer (0: a cut reply is unparsable), as the test stage.
        samples: Replies per held-out question (pass@1 is their mean correctness).
        seed: Seed of the sampling (each validation draws the same way, so two validations differ by the policy).
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 4096
    answer_budget: int = 64
    samples: int = 1
    seed: int = 1234


@dataclass
class PassRateFilter:
    """Keep only questions the starting policy sometimes gets right and sometimes wrong: a question that all or none
    of its G samples answer correctly gives every completion the same reward, so it carries no gradient. Measured
    once before training with the rollout sampler and settings (temperature, top-p/k, truncation), cached by content
    (questions, model, adapters, settings) in ``$MEDADAPT_CACHE/rl/pass_rates``.

    Args:
        samples: Samples per question (G of the measurement).
        max_new_tokens: Completion budget of the measurement (null: ``rl.max_new_tokens``).
        min_rate: Drop questions whose pass rate is ≤ this (0: drop those never answered right).
        max_rate: Drop questions whose pass rate is ≥ this (1: drop those always answered right).
        batch_size: Questions sampled at once.
    """

    samples: int = 8
    max_new_tokens: Optional[int] = None
    min_rate: float = 0.0
    max_rate: float = 1.0
    batch_size: int = 16


@dataclass
class GRPOConfig:
    """Reinforcement learning with verifiable rewards (GRPO) on multiple-choice questions.

    Args:
        group_size: Completions sampled per question (G).
        max_new_tokens: Completion budget while training (thinking included).
        temperature: Sampling temperature of the rollouts; every log-probability (policy, old, reference) is
            taken of the logits divided by it, so what is scored is what was sampled.
        top_p: Nucleus sampling threshold of the rollouts (both backends).
        top_k: Top-k filter of the rollouts; 0 is off (both backends; transformers would otherwise apply its
            default of 50 and vLLM none).
        beta: Weight of the KL penalty to the reference (the policy with its own LoRA off). 0 skips the reference.
        kl_ratio_weight: Multiply the k3 KL by the policy ratio (TRL's ``use_bias_correction_kl``, its default):
            the KL's gradient is then unbiased for samples from π_old.
        clip_eps: ε (lower, and upper unless ``clip_eps_high``) of the clipped policy ratio.
        clip_eps_high: ε_high of the clip (DAPO's clip-higher, e.g. 0.28); null: ``clip_eps``.
        scale_rewards: Advantage scaling: ``group`` (group std; GRPO), ``batch`` (the step's std), ``none``
            (Dr. GRPO).
        averaging: Normaliser of the step's summed loss: ``token`` (its loss tokens; DAPO), ``sequence`` (mean per
            completion, then over completions; the GRPO paper), ``constant`` (completions × max_new_tokens; Dr.
            GRPO). Always over the whole step: every micro-batch and rank.
        no_signal: Groups whose rewards are all equal: ``drop`` (out of the loss and the normaliser, never scored) or
            ``keep`` (their tokens count, as TRL; with β > 0 their KL term still acts).
        dynamic_sampling: DAPO's dynamic sampling: when fewer than ``batch_size`` groups of a step carry signal, draw
            the next batch of questions and add its groups with signal, up to ``max_refills`` more batches.
        max_refills: Extra batches dynamic sampling may draw for one step.
        updates_per_batch: μ: optimizer steps on each rollout batch (old log-probabilities stored before the first;
            from the second on the ratio differs from 1 and the clip binds).
        micro_batch_size: Completions per forward/backward when scoring (memory); the step's loss does not depend on
            it.
        truncation: A completion cut at ``max_new_tokens``: ``mask`` (out of the loss, DAPO's overlong filtering;
            its reward still counts in its group's mean), ``force`` (budget-forced as the test stage does: the thought
            is closed and ``answer_budget`` more tokens answer; the cue is not scored), ``keep`` (reward 0, every token
            in the loss; TRL's default).
        answer_budget: Tokens the forced answer gets (``truncation: force``).
        max_grad_norm: Clip the global gradient norm of each optimizer step (null: no clipping). Replaces
            ``trainer.gradient_clip_val``, which Lightning refuses when the module steps the optimizer itself.
        importance_sampling: vLLM rollouts only: correct the loss by π_old(trainer) / π(vLLM sampler), per token or per
            sequence, truncated at the cap (``*_truncate``) or masked above it (``*_mask``); ``off`` trusts vLLM's
            numbers to be the trainer's.
        importance_sampling_cap: The cap C of the importance weight.
        format_reward: Added to the reward of a completion that named a choice the reader could read (0: off).
        std_eps: ε of the std normalization.
        backend: Who samples the rollouts: ``hf`` (``generate`` in the training process) or ``vllm`` (one vLLM
            engine per rank kept running beside training, serving the base with any adapters under the policy merged,
            and the policy's LoRA saved after every update and sent with a fresh ``LoRARequest``).
        vllm_python: ``vllm`` backend: the interpreter with vLLM (as ``generation.vllm_python``).
        enforce_eager: ``vllm`` backend: skip CUDA graphs / compilation (faster start).
        vllm_engine_args: ``vllm`` backend: more ``vllm.LLM`` arguments (e.g. ``{gpu_memory_utilization: 0.3}``
            to leave the GPU to training).
        validation: How held-out questions are answered (the test stage's generative protocol).
        pass_rate_filter: Drop questions the starting policy always or never answers right (measured once, cached);
            null keeps every question.
    """

    group_size: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.001
    kl_ratio_weight: bool = True
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    scale_rewards: Literal["group", "batch", "none"] = "group"
    averaging: Literal["token", "sequence", "constant"] = "token"
    no_signal: Literal["drop", "keep"] = "drop"
    dynamic_sampling: bool = False
    max_refills: int = 3
    updates_per_batch: int = 1
    micro_batch_size: int = 8
    truncation: Literal["mask", "force", "keep"] = "mask"
    answer_budget: int = 64
    max_grad_norm: Optional[float] = 1.0
    importance_sampling: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask",
                                 "off"] = "token_truncate"
    importance_sampling_cap: float = 3.0
    format_reward: float = 0.0
    std_eps: float = 1e-4
    backend: Literal["hf", "vllm"] = "hf"
    vllm_python: Optional[str] = None
    enforce_eager: bool = False
    vllm_engine_args: Optional[dict] = None
    validation: HeldOutConfig = field(default_factory=HeldOutConfig)
    pass_rate_filter: Optional[PassRateFilter] = None

    def __post_init__(self) -> None:
        if isinstance(self.validation, dict):
            self.validation = HeldOutConfig(**self.validation)
        if isinstance(self.pass_rate_filter, dict):
            self.pass_rate_filter = PassRateFilter(**self.pass_rate_filter)
        problems = []

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                problems.append(f"{name} must be an integer ≥ {low} (got {value!r})")

        def number(name: str, ok, what: str, obj=self) -> None:
            value = getattr(obj, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
                problems.append(f"{name} must be {what} (got {value!r})")

        integer("group_size", 2)
        for name in ("max_new_tokens", "updates_per_batch", "micro_batch_size", "max_refills"):
            integer(name, 1 if name != "max_refills" else 0)
        integer("top_k", 0)
        integer("answer_budget", 0)
        number("temperature", lambda v: v > 0, "finite and > 0 (rollouts are sampled)")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        number("beta", lambda v: v >= 0, "finite and ≥ 0")
        number("clip_eps", lambda v: 0 < v < 1, "in (0, 1)")
        if self.clip_eps_high is not None:
            number("clip_eps_high", lambda v: v > 0, "> 0")
        number("std_eps", lambda v: v > 0, "finite and > 0 (it keeps a zero-spread group's advantage finite)")
        number("format_reward", lambda v: True, "finite")
        number("importance_sampling_cap", lambda v: v > 0, "finite and > 0")
        if self.max_grad_norm is not None:
            number("max_grad_norm", lambda v: v > 0, "finite and > 0, or null")
        if self.truncation == "force" and self.answer_budget < 1:
            problems.append("truncation: force needs answer_budget ≥ 1")
        v = self.validation
        number("temperature", lambda x: x >= 0, "finite and ≥ 0 (validation)", v)
        number("top_p", lambda x: 0 < x <= 1, "in (0, 1] (validation)", v)
        for name in ("max_new_tokens", "samples"):
            if not (isinstance(getattr(v, name), int) and getattr(v, name) >= 1):
                problems.append(f"validation.{name} must be an integer ≥ 1")
        if v.temperature == 0 and v.samples > 1:
            problems.append("validation: greedy decoding (temperature 0) gives one reply per question: samples: 1")
        f = self.pass_rate_filter
        if f is not None:
            if not (isinstance(f.samples, int) and f.samples >= 2):
                problems.append("pass_rate_filter.samples must be an integer ≥ 2")
            if not (0 <= f.min_rate < f.max_rate <= 1):
                problems.append("pass_rate_filter needs 0 ≤ min_rate < max_rate ≤ 1")
        if problems:
            raise ValueError("rl: " + "; ".join(problems))

    @property
    def eps_high(self) -> float:
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4,
                     batch_std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(Q, G) rewards → (Q, G) advantages, centred on each question's group. ``group``: divided by the group's std
    (Bessel-corrected, as TRL and verl); ``batch``: by ``batch_std`` (the step's, over every rank; this batch's when
    not given); ``none``: not scaled (Dr. GRPO)."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale == "batch":
        std = rewards.flatten().std() if batch_std is None else batch_std
        return centered / (std + eps)
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> torch.Tensor:
    """(N, T) weights π_old / π_sampler of vLLM-sampled tokens: per token or per sequence (the product over its
    tokens), truncated at ``cap`` or zeroed above it (TRL's ``vllm_importance_sampling_mode``). Tokens the sampler
    gave no log-probability for (NaN) get weight 1."""
    diff = torch.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=cap)
    else:
        ratio = ratio.masked_fill(ratio > cap, 0.0)
    return ratio.expand_as(old_logp)


def grpo_terms(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor],
               advantages: torch.Tensor, mask: torch.Tensor, cfg: GRPOConfig,
               is_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed GRPO loss of N completions of T tokens, before normalisation (``logp``/``old_logp``/``ref_logp``:
    (N, T) log-probabilities of the sampled tokens at the sampling temperature; ``advantages``: (N,); ``mask``:
    (N, T), 1 on the tokens that enter the loss). ``averaging: sequence`` sums each completion's token mean;
    the others sum tokens. Returns the sum and detached sums for the logs (KL, clipped tokens low/high, tokens)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.eps_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if ref_logp is not None and cfg.beta > 0:
        log_ref_ratio = ref_logp - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
        per_token = per_token + cfg.beta * (kl * ratio if cfg.kl_ratio_weight else kl)
    if cfg.averaging == "sequence":
        total = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    else:
        total = (per_token * mask).sum()
    with torch.no_grad():
        low = (ratio < 1 - cfg.clip_eps) & (adv < 0)
        high = (ratio > 1 + cfg.eps_high) & (adv > 0)
        stats = {"kl_sum": (kl * mask).sum() if kl is not None else mask.new_zeros(()),
                 "clipped_low": (low.to(mask.dtype) * mask).sum(), "clipped_high": (high.to(mask.dtype) * mask).sum(),
                 "loss_tokens": mask.sum()}
    return total, stats


def normaliser(cfg: GRPOConfig, tokens: float, completions: float) -> float:
    """What the step's summed loss is divided by (``averaging``), from the step's global loss-token and
    loss-completion counts; at least 1, so a step with nothing to learn gives a zero gradient, not NaN."""
    if cfg.averaging == "token":
        value = tokens
    elif cfg.averaging == "sequence":
        value = completions
    else:
        value = completions * cfg.max_new_tokens
    return max(float(value), 1.0)
