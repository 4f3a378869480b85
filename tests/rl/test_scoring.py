"""What GRPO scores: chunked log-probabilities equal the full computation, at the temperature the rollout was sampled
at (the sampler's own scores), and the reference is exactly base + the frozen adapters."""

from __future__ import annotations

import pytest
import torch

from medadapt.eval.generative import left_pad, sampling_kwargs
from medadapt.model import load_model
from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.rl.scoring import collate_scoring, completion_logprobs, reference_policy

from ..conftest import assert_close_to_scale, assert_gradients_close


def policy(path, base_adapters=(), seed=0):
    """A LoRA policy whose LoRA is not zero (so policy ≠ reference), fp32, no dropout."""
    torch.manual_seed(seed)
    model = load_model(ModelConfig(name_or_path=path, load_in_4bit=False, compute_dtype="float32",
                                   gradient_checkpointing=False, base_adapters=list(base_adapters)),
                       LoraConfig(r=4, alpha=8, dropout=0.0), training=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                p.normal_(0, 0.05)
    return model


def some_rollout(pad_id, seed=0):
    """Three prompts of different lengths (left padding matters) with completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (4, 7, 5)]
    completions = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (6, 3, 9)]
    scored = [[1] * len(c) for c in completions]
    scored[2][2:5] = [0, 0, 0]  # a forced cue: in the context, not scored
    return prompts, completions, scored, collate_scoring(prompts, completions, scored, pad_id)


def full_logprobs(model, prompts, completions, temperature, entropies=None):
    """The plain computation, one sequence at a time: log_softmax(logits / T) of every completion token (and, into
    ``entropies``, each position's entropy)."""
    out = []
    for p, c in zip(prompts, completions):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        out.append(logp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
        if entropies is not None:
            entropies.append(-(logp.exp() * logp).sum(-1).detach())
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_log_probs_and_gradients_equal_the_full_computation(tiny_qwen, temperature, monkeypatch):
    import medadapt.rl.scoring as scoring

    monkeypatch.setattr(scoring, "CHUNK", 4)  # several chunks per micro-batch
    model = policy(tiny_qwen)
    prompts, completions, scored, batch = some_rollout(0)
    logp, entropy = completion_logprobs(model, batch, temperature, with_entropy=True)
    with torch.no_grad():  # how π_old and the reference are scored: the same numbers
        assert_close_to_scale(completion_logprobs(model, batch, temperature)[0], logp.detach(), rtol=1e-6)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)
    (logp * weights * batch["score_mask"]).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    entropies = []
    expected = full_logprobs(model, prompts, completions, temperature, entropies)
    total, expected_entropy = 0, 0.0
    for b, (e, s) in enumerate(zip(expected, scored)):
        keep = torch.tensor(s, dtype=torch.bool)
        assert_close_to_scale(logp[b, : len(s)][keep], e[keep].detach(), rtol=1e-5)
        assert torch.all(logp[b, : len(s)][~keep] == 0) and torch.all(logp[b, len(s):] == 0)
        total = total + (e * weights[b, : len(s)] * keep).sum()
        expected_entropy += float(entropies[b][keep].sum())
    total.backward()
    assert_gradients_close(ours, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert float(entropy) == pytest.approx(expected_entropy, rel=1e-5) and not entropy.requires_grad


def test_scores_are_the_sampler_s_own_at_its_temperature(tiny_qwen):
    """At T = 0.6 the scored log-probability of each sampled token is log_softmax of the sampler's own (processed)
    scores — also when the model's generation config carries a top-k, which must not leak into the rollouts. Without
    the temperature the scorer would be several nats off (what issue 25 measured)."""
    model = policy(tiny_qwen)
    model.get_base_model().generation_config.top_k = 5  # a checkpoint's default that would cut the distribution
    model.eval()
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]
    ids, mask = left_pad(prompts, 0)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True, **sampling_kwargs(0.6, 1.0, 0))
    new = out.sequences[:, ids.shape[1]:]
    sampler = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                           for t, s in enumerate(out.scores)], dim=1)
    assert torch.isfinite(sampler).all()  # no token outside a top-k
    batch = collate_scoring(prompts, new.tolist(), [[1] * new.shape[1]] * 2, 0)
    with torch.no_grad():
        scored, _ = completion_logprobs(model, batch, 0.6)
        at_one, _ = completion_logprobs(model, batch, 1.0)
    assert_close_to_scale(scored, sampler, rtol=1e-5)
    assert (at_one - sampler).abs().max() > 0.05  # scoring at T = 1 is another distribution (1000x the tolerance)
    torch.manual_seed(0)
    with torch.no_grad():  # what the rollouts did before: temperature and top-p only, the rest from the defaults
        leaky = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, do_sample=True,
                               temperature=0.6, top_p=1.0, output_scores=True, return_dict_in_generate=True)
    drawn = leaky.sequences[:, ids.shape[1]:]
    leaky_sampler = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, drawn[:, t : t + 1]).squeeze(-1)
                                 for t, s in enumerate(leaky.scores)], dim=1)
    with torch.no_grad():
        rescored, _ = completion_logprobs(model, collate_scoring(prompts, drawn.tolist(), [[1] * drawn.shape[1]] * 2, 0),
                                          0.6)
    assert (leaky_sampler - rescored).abs().min() > 5  # sampled from 5 tokens of 151k: every token nats off


def test_the_reference_is_exactly_base_plus_the_frozen_adapters(tiny_qwen, tmp_path):
    """After CPT→SFT the RL policy is base + CPT + SFT + its own LoRA; with its LoRA off it must compute exactly what
    base + CPT + SFT computes alone (a model loaded with those adapters and nothing else), and neither the raw base
    nor base + CPT."""
    from medadapt.weights import write_scaled_adapter

    base = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[],
                       gradient_checkpointing=False)
    write_scaled_adapter(base, tmp_path / "cpt", rho=0.05, seed=1)
    write_scaled_adapter(ModelConfig(**{**base.__dict__, "base_adapters": [str(tmp_path / "cpt")]}), tmp_path / "sft",
                         rho=0.05, seed=2)
    stacks = {"base": [], "cpt": [str(tmp_path / "cpt")], "cpt+sft": [str(tmp_path / "cpt"), str(tmp_path / "sft")],
              "sft": [str(tmp_path / "cpt"), str(tmp_path / "sft")]}
    *_, batch = some_rollout(0)

    def alone(adapters):
        model = load_model(ModelConfig(**{**base.__dict__, "base_adapters": adapters}), training=False)
        with torch.no_grad():
            return completion_logprobs(model, batch, 0.6)[0]

    for label in ("sft", "cpt+sft"):
        model = policy(tiny_qwen, base_adapters=stacks[label])
        with torch.no_grad(), reference_policy(model):
            ref = completion_logprobs(model, batch, 0.6)[0]
        with torch.no_grad():
            own = completion_logprobs(model, batch, 0.6)[0]
        assert_close_to_scale(ref, alone(stacks[label]), rtol=1e-6)
        assert (own - ref).abs().max() > 1e-3  # the policy's own LoRA does move it
        for other in ("base", "cpt"):
            assert (ref - alone(stacks[other])).abs().max() > 1e-4, other


def test_the_float16_path_equals_the_full_computation_within_float16_precision():
    """``16-mixed`` (GPUs without bf16) scores in float16: the log-probabilities and their gradient with respect to
    the hidden states against float64 on the same float16 values, within 1e-2 of scale (float16 keeps ~3 digits)."""
    import torch.nn.functional as F

    from medadapt.rl.scoring import chunked_logprobs

    g = torch.Generator().manual_seed(0)
    rows, dim, vocab, temperature = 40, 32, 512, 0.6
    hidden = torch.randn(rows, dim, generator=g).to(torch.float16)
    head = torch.nn.Linear(dim, vocab, bias=False).to(torch.float16).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g) * 0.5)
    targets, weights = torch.randint(0, vocab, (rows,), generator=g), torch.linspace(-1, 1, rows)
    h = hidden.clone().requires_grad_()
    logp, _ = chunked_logprobs(h[None], head, torch.arange(rows), targets, temperature, chunk=16)
    (logp * weights).sum().backward()
    h64 = hidden.double().requires_grad_()
    full = torch.log_softmax(F.linear(h64, head.weight.double()) / temperature, -1).gather(-1, targets[:, None])[:, 0]
    (full * weights.double()).sum().backward()
    assert_close_to_scale(logp.double(), full.detach(), rtol=1e-2)
    assert_close_to_scale(h.grad.double(), h64.grad, rtol=1e-2)
