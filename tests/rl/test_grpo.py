"""GRPO's objective against the paper's formula, its invariants (micro-batches and ranks give one batch's gradient),
the KL's direction, the importance weights, the settings' checks, and the reward's reader."""

from __future__ import annotations

import pytest
import torch

from medadapt.rl.grpo import GRPOConfig, group_advantages, grpo_terms, importance_weights, normaliser

from ..conftest import assert_close_to_scale


def paper_loss(logp, old_logp, ref_logp, rewards, mask, beta, eps, averaging, kind="group", std_eps=1e-4,
               eps_high=None, kl_ratio_weight=True, max_new_tokens=None):
    """GRPO as DeepSeekMath (§4.1, eq. 3) writes it, element by element with Python loops, with the conventions TRL
    shares: the std with Bessel's correction, k3 weighted by the ratio (``use_bias_correction_kl``); ``token``
    averaging is DAPO's (sum over all completion tokens / their number), ``sequence`` the paper's (1/G Σ_i 1/|o_i|
    Σ_t), ``constant`` Dr. GRPO's (sum / (completions × max_new_tokens))."""
    Q, G = rewards.shape
    eps_high = eps if eps_high is None else eps_high
    total, count, per_seq = 0.0, 0, []
    for q in range(Q):
        r = [float(x) for x in rewards[q]]
        mean = sum(r) / G
        std = (sum((x - mean) ** 2 for x in r) / (G - 1)) ** 0.5
        for g in range(G):
            i = q * G + g
            adv = (r[g] - mean) if kind == "none" else (r[g] - mean) / (std + std_eps)
            seq, n = 0.0, 0
            for t in range(logp.shape[1]):
                if not mask[i, t]:
                    continue
                ratio = torch.exp(logp[i, t] - old_logp[i, t])
                clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high)
                surrogate = torch.minimum(ratio * adv, clipped * adv)
                kl = torch.exp(ref_logp[i, t] - logp[i, t]) - (ref_logp[i, t] - logp[i, t]) - 1
                term = -(surrogate - beta * kl * (ratio if kl_ratio_weight else 1))
                total, count, seq, n = total + term, count + 1, seq + term, n + 1
            per_seq.append(seq / max(n, 1))
    if averaging == "token":
        return total / count
    if averaging == "constant":
        return total / (Q * G * max_new_tokens)
    return sum(per_seq) / len(per_seq)


def step_loss(logp, old, ref, adv, mask, cfg):
    """medadapt's loss of one batch: the summed terms over its normaliser (what ``backprop`` divides by)."""
    total, stats = grpo_terms(logp, old, ref, adv, mask, cfg)
    return total / normaliser(cfg, float(mask.sum()), mask.shape[0]), stats


def fixed_batch(seed=0, Q=3, G=4, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(Q * G, T, generator=g) * 3).requires_grad_()
    old = (logp.detach() + 0.3 * torch.randn(Q * G, T, generator=g)).clamp(max=0)  # off-policy: ratios ≠ 1
    ref = (logp.detach() + 0.2 * torch.randn(Q * G, T, generator=g)).clamp(max=0)
    rewards = torch.randint(0, 2, (Q, G), generator=g).float()
    rewards[0] = 1.0  # one group with no signal
    lengths = torch.randint(2, T + 1, (Q * G,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, old, ref, rewards, mask


@pytest.mark.parametrize("averaging", ["token", "sequence", "constant"])
@pytest.mark.parametrize("kind", ["group", "none"])
@pytest.mark.parametrize("kl_ratio_weight", [True, False])
def test_loss_and_gradients_equal_the_paper_s_formula(averaging, kind, kl_ratio_weight):
    logp, old, ref, rewards, mask = fixed_batch()
    cfg = GRPOConfig(beta=0.04, clip_eps=0.2, clip_eps_high=0.28, averaging=averaging, scale_rewards=kind,
                     kl_ratio_weight=kl_ratio_weight, max_new_tokens=logp.shape[1])
    adv = group_advantages(rewards, kind).flatten()
    loss, stats = step_loss(logp, old, ref, adv, mask, cfg)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = paper_loss(logp, old, ref, rewards, mask, 0.04, 0.2, averaging, kind, eps_high=0.28,
                          kl_ratio_weight=kl_ratio_weight, max_new_tokens=logp.shape[1])
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert_close_to_scale(loss, expected, rtol=1e-6)
    assert_close_to_scale(grad, expected_grad, rtol=1e-6)
    assert stats["clipped_low"] + stats["clipped_high"] > 0  # off-policy ratios bind the clip here


def test_a_group_whose_rewards_are_all_equal_gives_no_gradient():
    logp, old, ref, rewards, mask = fixed_batch()
    rewards[:] = rewards[0]  # every group: all equal
    adv = group_advantages(rewards).flatten()
    assert torch.equal(adv, torch.zeros_like(adv))
    loss, _ = step_loss(logp, old, ref, adv, mask, GRPOConfig(beta=0.0))
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("averaging", ["token", "sequence", "constant"])
def test_micro_batches_and_ranks_give_the_gradients_of_one_batch(averaging):
    """What a step does: every micro-batch of every rank back-propagates its summed terms × world / the step's global
    normaliser, gradients accumulate over micro-batches and DDP averages them over ranks. That equals the one-batch
    gradient exactly (2 ranks × 3 uneven micro-batches here)."""
    logp, old, ref, rewards, mask = fixed_batch(seed=1, Q=4)
    cfg = GRPOConfig(beta=0.04, averaging=averaging, max_new_tokens=logp.shape[1])
    adv = group_advantages(rewards).flatten()
    full, _ = step_loss(logp, old, ref, adv, mask, cfg)
    (expected,) = torch.autograd.grad(full, logp)
    norm = normaliser(cfg, float(mask.sum()), mask.shape[0])
    grads = torch.zeros_like(logp)
    for rank in (slice(0, 8), slice(8, 16)):
        rank_grad = torch.zeros_like(logp)
        for micro in (slice(0, 3), slice(3, 4), slice(4, 8)):
            rows = torch.arange(16)[rank][micro]
            local = logp[rows].detach().requires_grad_()
            total, _ = grpo_terms(local, old[rows], ref[rows], adv[rows], mask[rows], cfg)
            (g,) = torch.autograd.grad(total * 2 / norm, local)
            rank_grad[rows] += g
        grads += rank_grad / 2  # DDP: the mean over 2 ranks
    assert_close_to_scale(grads, expected, rtol=1e-6)


def test_the_kl_is_k3_of_the_reference_over_the_policy():
    """k3 = r − log r − 1 with r = π_ref/π_θ, sampled from π_θ, estimates KL(π_θ ‖ π_ref) without bias (Schulman):
    its expectation under π_θ over a whole (small) vocabulary is exactly that KL, and not KL(π_ref ‖ π_θ), which the
    other direction (r = π_θ/π_ref) would estimate."""
    policy = torch.log_softmax(torch.tensor([4.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.5]), dim=0)  # peaked
    reference = torch.log_softmax(torch.zeros(7), dim=0)  # flat: the two directions differ by a lot
    cfg = GRPOConfig(beta=1.0, kl_ratio_weight=False)
    terms = []
    for token in range(7):  # one one-token completion per vocabulary entry, advantage 0: only the KL term
        total, stats = grpo_terms(policy[token].view(1, 1), policy[token].view(1, 1), reference[token].view(1, 1),
                                  torch.zeros(1), torch.ones(1, 1), cfg)
        terms.append(stats["kl_sum"])
        assert_close_to_scale(total, stats["kl_sum"], rtol=1e-6)
    expectation = (policy.exp() * torch.stack(terms)).sum()
    forward = (policy.exp() * (policy - reference)).sum()  # KL(π_θ ‖ π_ref)
    backward = (reference.exp() * (reference - policy)).sum()  # KL(π_ref ‖ π_θ)
    assert_close_to_scale(expectation, forward, rtol=1e-5)
    assert abs(float(expectation - backward)) > 0.05


def test_importance_weights_truncate_or_mask_per_token_or_sequence():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.9, 0.9]]))
    sampler = torch.log(torch.tensor([[0.1, 0.5, float("nan")], [0.2, 0.3, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    token = importance_weights(old, sampler, mask, "token_truncate", 3.0)
    assert_close_to_scale(token, torch.tensor([[3.0, 1.0, 1.0], [1.0, 3.0, 1.0]]), rtol=1e-6)  # 5 and 3 → cap; NaN → 1
    assert importance_weights(old, sampler, mask, "token_mask", 2.9)[0].tolist()[0] == 0.0  # above the cap: masked
    sequence = importance_weights(old, sampler, mask, "sequence_truncate", 10.0)
    assert_close_to_scale(sequence, torch.tensor([[5.0] * 3, [3.0] * 3]), rtol=1e-5)  # product over its tokens
    assert importance_weights(old, sampler, mask, "sequence_mask", 4.0)[0].tolist() == [0.0] * 3


def test_settings_are_checked():
    for bad in ({"group_size": 1}, {"temperature": 0.0}, {"beta": -1.0}, {"clip_eps": 1.5}, {"max_new_tokens": 0},
                {"std_eps": 0.0}, {"format_reward": float("nan")}, {"top_k": -1}, {"micro_batch_size": 0},
                {"updates_per_batch": 0}, {"max_grad_norm": float("inf")}, {"importance_sampling_cap": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOConfig(**bad)
    with pytest.raises(ValueError, match="answer_budget"):
        GRPOConfig(truncation="force", answer_budget=0)
    with pytest.raises(ValueError, match="validation"):
        GRPOConfig(validation={"temperature": 0.0, "samples": 4})


def test_the_reward_reads_answers_with_the_test_stage_s_reader(r1_tokenizer):
    """The same reader as the test stage: every rule (a final statement in Spanish, a self-correction, a lone
    choice line) earns the reward exactly where extract_answer reads the gold choice."""
    from medadapt.eval.generative import GenRow, extract_answer
    from medadapt.eval.tasks import Item
    from medadapt.rl.rollout import Completion, reward

    item = Item("q", "0", "", ["A", "B", "C", "D"], 2, "Which?", ["w", "x", "y", "z"])
    replies = ["Thinking.\n</think>\n\nLa respuesta correcta es la C.", "</think>\nThe answer is A. Wait, no: C.",
               "</think>\nC\n\nBecause y.", "</think>\nThe answer is B.", "still thinking", "</think>\nNo idea."]
    rows = [GenRow(item, [1, 2, 3], thinking=True)]
    completions = [Completion(0, [1, 2, 3], r1_tokenizer.encode(t, add_special_tokens=False) + [r1_tokenizer.eos_token_id],
                              []) for t in replies]
    reward(completions, rows, r1_tokenizer, GRPOConfig(group_size=len(replies)))
    assert [c.reward for c in completions] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [float(extract_answer(t, item, True) == 2) for t in replies] == [c.reward for c in completions]
    assert [c.parse for c in completions] == ["final_statement", "final_statement", "lone_choice_line",
                                              "final_statement", "no_answer", "unparsable"]
