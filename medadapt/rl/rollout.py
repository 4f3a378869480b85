"""Rollouts: G completions per question sampled from the current policy, rewarded by the test stage's own reader.

Both backends sample the same distribution, the one the scorer scores: ``softmax(logits / temperature)`` cut by
the configured top-p/top-k and nothing else (``eval.generative.sampling_kwargs`` for HF ``generate``; the same
settings for vLLM, which also returns each chosen token's log-probability after temperature and filtering, for the
importance weights). A completion runs up to and including its first EOS. One cut at ``max_new_tokens`` is
*truncated*; with ``truncation: force`` its open thought is closed with the test stage's cue and it gets
``answer_budget`` more tokens, as the test stage does (the cue's tokens were not sampled: they are never scored).

The reward is 1 when ``eval.generative.read_reply`` reads the gold choice (plus ``format_reward`` for any readable
choice), else 0: exactly what the test stage would count, parse rules included.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from medadapt.eval.generative import FORCED_ANSWER, GenRow, left_pad, read_reply, sampling_kwargs
from medadapt.model import unwrapped
from medadapt.rl.grpo import GRPOConfig


@dataclass
class Sampling:
    """How completions are drawn: the distribution (temperature, top-p, top-k: 0 off), the budget, and budget forcing
    (``force_budget`` more tokens for a cut thought; 0: none)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    force_budget: int = 0

    @classmethod
    def of(cls, cfg: GRPOConfig, max_new_tokens: Optional[int] = None) -> "Sampling":
        """The rollouts' sampling (``max_new_tokens`` overrides the budget, e.g. for the pass-rate filter)."""
        return cls(cfg.temperature, cfg.top_p, cfg.top_k, max_new_tokens or cfg.max_new_tokens,
                   cfg.answer_budget if cfg.truncation == "force" else 0)


@dataclass
class Completion:
    """One sampled completion of one question, as it will be scored."""

    question: int  # index of its question in the batch: completions of one question form a group
    prompt: list[int]
    ids: list[int]  # every token after the prompt: sampled, and (when forced) the cue and the forced answer
    sampled: list[int]  # 1 where the policy sampled the token, 0 on the forcing cue
    finished: bool = False  # ended with EOS within max_new_tokens
    truncated: bool = False  # cut at max_new_tokens (before any forcing)
    forced: bool = False
    sampler_logp: Optional[list[Optional[float]]] = None  # vLLM's log-probability of each token (None: unknown)
    reward: float = 0.0
    pred: Optional[int] = None
    parse: str = ""

    @property
    def right(self) -> bool:
        return self.reward >= 1.0


@contextmanager
def generating(model):
    """Eval mode and the KV cache for ``generate``; training mode and no cache afterwards."""
    base = unwrapped(model)
    was_training, cache = model.training, base.config.use_cache
    model.eval()
    base.config.use_cache = True
    try:
        yield model
    finally:
        base.config.use_cache = cache
        model.train(was_training)


def _until_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    """Up to and including the first EOS, and whether there was one."""
    return (ids[: ids.index(eos) + 1], True) if eos in ids else (ids, False)


def needs_forcing(row: GenRow, ids: list[int], close: list[int]) -> bool:
    """A cut completion whose prompt opened a thought it never closed (what the test stage budget-forces)."""
    n = len(close)
    return row.thinking and not any(ids[i : i + n] == close for i in range(len(ids) - n + 1))


@torch.no_grad()
def sample_hf(model, tokenizer, rows: list[GenRow], n: int, sampling: Sampling, device) -> list[Completion]:
    """``n`` completions per row with HF ``generate`` (eval mode: no dropout; KV cache on), budget-forced when
    ``sampling.force_budget``; the draws come from torch's RNG (the run's, saved in checkpoints)."""
    eos = tokenizer.eos_token_id
    ids, mask = left_pad([r.input_ids for r in rows], tokenizer.pad_token_id)
    how = sampling_kwargs(sampling.temperature, sampling.top_p, sampling.top_k)
    with generating(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **how)
    completions = []
    for k, new in enumerate(out[:, ids.shape[1]:].tolist()):
        row = rows[k // n]
        new, finished = _until_eos(new, eos)
        completions.append(Completion(k // n, list(row.input_ids), new, [1] * len(new), finished, not finished))
    if sampling.force_budget:
        close = tokenizer.encode("</think>", add_special_tokens=False)
        cue = tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)
        todo = [c for c in completions if c.truncated and needs_forcing(rows[c.question], c.ids, close)]
        if todo:
            fids, fmask = left_pad([c.prompt + c.ids + cue for c in todo], tokenizer.pad_token_id)
            with generating(model):
                more = model.generate(input_ids=fids.to(device), attention_mask=fmask.to(device),
                                      max_new_tokens=sampling.force_budget, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=eos, **how)
            for c, answer in zip(todo, more[:, fids.shape[1]:].tolist()):
                answer, _ = _until_eos(answer, eos)
                c.ids, c.sampled, c.forced = c.ids + cue + answer, c.sampled + [0] * len(cue) + [1] * len(answer), True
    return completions


def vllm_request(tokenizer, rows: list[GenRow], n: int, sampling: Sampling, seed: int, lora: dict) -> dict:
    """The worker request: the sampling settings, the chosen tokens' log-probabilities, budget forcing if asked."""
    force = {}
    if sampling.force_budget:
        force = {"budget": sampling.force_budget, "close": tokenizer.encode("</think>", add_special_tokens=False),
                 "cue": tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)}
    return {"prompts": [r.input_ids for r in rows], "thinking": [r.thinking for r in rows],
            "eos": [tokenizer.eos_token_id], "force": force, "lora": lora,
            "sampling": {"n": n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "top_k": sampling.top_k, "seed": seed, "max_tokens": sampling.max_new_tokens,
                         "logprobs": True}}


def completions_of(response: dict, rows: list[GenRow], tokenizer, cue: list[int]) -> list[Completion]:
    """The worker's samples as completions, each up to and including EOS (vLLM stops before it; it is appended, as
    HF's completions hold it, with an unknown sampler log-probability)."""
    eos, out = tokenizer.eos_token_id, []
    for q, samples in enumerate(response["outputs"]):
        for s in samples:
            ids, logp = list(s["ids"]), list(s.get("logprobs") or [None] * len(s["ids"]))
            if s["finished"] and (not ids or ids[-1] != eos):
                ids, logp = ids + [eos], logp + [None]
            c = Completion(q, list(rows[q].input_ids), ids, [1] * len(ids), s["finished"], not s["finished"],
                           sampler_logp=logp)
            if s.get("forced") is not None:
                answer, answer_logp = list(s["forced"]), list(s.get("forced_logprobs") or [None] * len(s["forced"]))
                if s.get("forced_finished") and (not answer or answer[-1] != eos):
                    answer, answer_logp = answer + [eos], answer_logp + [None]
                c.ids, c.forced = c.ids + cue + answer, True
                c.sampled = c.sampled + [0] * len(cue) + [1] * len(answer)
                c.sampler_logp = c.sampler_logp + [None] * len(cue) + answer_logp
            out.append(c)
    return out


def reward(completions: list[Completion], rows: list[GenRow], tokenizer, cfg: GRPOConfig) -> None:
    """Read every completion with the test stage's reader and set its reward, prediction and parse path."""
    for c in completions:
        row = rows[c.question]
        text = tokenizer.decode(c.ids, skip_special_tokens=True)
        c.pred, c.parse = read_reply(text, row.item, row.thinking)
        c.reward = float(c.pred == row.item.gold)
        if cfg.format_reward and c.pred is not None:
            c.reward += cfg.format_reward


def rewards_tensor(completions: list[Completion], n: int) -> torch.Tensor:
    """(Q, n) rewards, grouped by question."""
    return torch.tensor([c.reward for c in completions], dtype=torch.float32).view(-1, n)


class Clock:
    """Seconds spent in named phases of a step (generation, scoring, update)."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
