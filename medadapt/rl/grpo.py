"""GRPO: the objective, written so that it can be checked against the paper line by line.

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath §4.1; used for DeepSeek-R1). For each
question q, G completions o_1..o_G are sampled from the current policy π_old. Each gets a reward r_i (here: 1
when medadapt's answer reader reads the gold choice, else 0). Advantages are relative to the group:

    GRPO:     Â_i = (r_i − mean(r)) / (std(r) + ε)          (std over the group, population form)
    Dr. GRPO: Â_i =  r_i − mean(r)                          (Liu et al., 2025: no std normalization)

and every token t of o_i carries Â_i. With the policy ratio ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) /
π_old(o_{i,t} | …), the clipped surrogate and the KL penalty per token are

    L_{i,t} = −min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1 − ε_clip, 1 + ε_clip) Â_i) + β · KL_{i,t}
    KL_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1                (Schulman's k3 estimator, unbiased, ≥ 0)

**Averaging.** ``token`` (the default; DAPO, Yu et al., 2025): the sum of L_{i,t} over every completion token of
the batch divided by the number of those tokens, so a long completion weighs by its length and no token counts
more because its completion is short. ``sequence`` (the paper's form): the mean over each completion's tokens,
then the mean over completions. Under DDP the token count is the global one, so N processes give the
gradients of one (``global_tokens``).

A group whose rewards are all equal has Â = 0 for every completion: only the KL term moves the policy, and with
β = 0 its gradient is exactly zero. One optimizer step per sampled batch (μ = 1) makes π_old = π_θ numerically,
so ρ = 1 and the clip never binds; the clipped form is kept so that μ > 1 or off-policy samples stay correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch



@dataclass
class GRPOConfig:
    """Reinforcement learning with verifiable rewards (GRPO) on multiple-choice questions.

    Args:
        group_size: Completions sampled per question (G).
        max_new_tokens: Completion budget while training (thinking included); a completion cut there that never
            closed its thought is unparsable: reward 0.
        temperature: Sampling temperature of the rollouts.
        top_p: Nucleus sampling threshold of the rollouts.
        beta: Weight of the KL penalty to the reference (the policy with its own LoRA off).
        clip_eps: ε of the clipped policy ratio.
        advantage: ``grpo`` (group mean and std) or ``dr_grpo`` (group mean only, Liu et al. 2025).
        averaging: ``token`` (every completion token of the batch weighs the same; DAPO) or ``sequence``
            (mean per completion, then over completions; the GRPO paper).
        format_reward: Added to the reward of a completion that closed its thought and named a choice (0: off);
            correctness alone is the default reward.
        eval_max_new_tokens: Budget of the greedy answers on the held-out questions (validation).
        std_eps: ε of the std normalization.
        backend: Who samples the rollouts: ``hf`` (``generate`` in the training process) or ``vllm`` (one vLLM
            engine kept running beside training, serving the base with any adapters under the policy merged, and
            the policy's LoRA saved after every update and sent with a fresh ``LoRARequest``).
        vllm_python: ``vllm`` backend: the interpreter with vLLM (as ``generation.vllm_python``).
        enforce_eager: ``vllm`` backend: skip CUDA graphs / compilation (faster start).
        vllm_engine_args: ``vllm`` backend: more ``vllm.LLM`` arguments (e.g. ``{gpu_memory_utilization: 0.3}``
            to leave the GPU to training).
    """

    group_size: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.001
    clip_eps: float = 0.2
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    averaging: Literal["token", "sequence"] = "token"
    format_reward: float = 0.0
    eval_max_new_tokens: int = 1024
    std_eps: float = 1e-4
    backend: Literal["hf", "vllm"] = "hf"
    vllm_python: Optional[str] = None
    enforce_eager: bool = False
    vllm_engine_args: Optional[dict] = None

    def __post_init__(self) -> None:
        import math

        problems = []
        if not (isinstance(self.group_size, int) and self.group_size >= 2):
            problems.append(f"group_size must be ≥ 2 (a group of one has no relative advantage; got {self.group_size!r})")
        for name in ("max_new_tokens", "eval_max_new_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                problems.append(f"{name} must be an integer ≥ 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be finite and > 0 (rollouts are sampled; got {self.temperature!r})")
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not (math.isfinite(self.beta) and self.beta >= 0) or not (0 < self.clip_eps < 1):
            problems.append(f"beta must be ≥ 0 and clip_eps in (0, 1) (got {self.beta!r}, {self.clip_eps!r})")
        if problems:
            raise ValueError("rl: " + "; ".join(problems))


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """(Q, G) rewards → (Q, G) advantages, relative to each question's group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "dr_grpo":
        return centered
    return centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float, clip_eps: float, averaging: str = "token",
              global_tokens: Optional[torch.Tensor] = None, global_sequences: Optional[int] = None,
              world_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of N completions of T tokens (``logp``/``old_logp``/``ref_logp``: (N, T) log-probabilities of
    the sampled tokens; ``advantages``: (N,); ``mask``: (N, T), 1 on completion tokens).

    Under DDP pass the global token count (``averaging: token``) or completion count (``sequence``) and the world
    size: DDP averages gradients over ranks, so each rank's loss is scaled to make that average the global one.
    Returns the loss and detached statistics (mean KL, clipped fraction, token count).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -surrogate + beta * kl
    if averaging == "token":
        tokens = global_tokens if global_tokens is not None else mask.sum()
        loss = (per_token * mask).sum() * world_size / tokens.clamp(min=1)
    else:
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        sequences = global_sequences if global_sequences is not None else per_sequence.shape[0]
        loss = per_sequence.sum() * world_size / max(sequences, 1)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
        stats = {"kl": (kl * mask).sum() / n, "clipped_fraction": (clipped.to(mask.dtype) * mask).sum() / n,
                 "tokens": mask.sum()}
    return loss, stats
