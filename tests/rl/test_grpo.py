"""GRPO's objective against the paper's formula, its invariants, and the reward's reader."""

from __future__ import annotations

import pytest
import torch

from medadapt.rl.grpo import GRPOConfig, group_advantages, grpo_loss

from ..conftest import assert_close_to_scale


def paper_loss(logp, old_logp, ref_logp, rewards, mask, beta, eps, averaging, kind="grpo", std_eps=1e-4):
    """GRPO as DeepSeekMath (§4.1, eq. 3) writes it, element by element with Python loops; ``token`` averaging is
    DAPO's (sum over all completion tokens / their number), ``sequence`` the paper's (1/G Σ_i 1/|o_i| Σ_t)."""
    Q, G = rewards.shape
    total, count, per_seq = 0.0, 0, []
    for q in range(Q):
        r = [float(x) for x in rewards[q]]
        mean = sum(r) / G
        std = (sum((x - mean) ** 2 for x in r) / G) ** 0.5
        for g in range(G):
            i = q * G + g
            adv = (r[g] - mean) if kind == "dr_grpo" else (r[g] - mean) / (std + std_eps)
            seq, n = 0.0, 0
            for t in range(logp.shape[1]):
                if not mask[i, t]:
                    continue
                ratio = torch.exp(logp[i, t] - old_logp[i, t])
                clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
                surrogate = torch.minimum(ratio * adv, clipped * adv)
                kl = torch.exp(ref_logp[i, t] - logp[i, t]) - (ref_logp[i, t] - logp[i, t]) - 1
                term = -(surrogate - beta * kl)
                total, count, seq, n = total + term, count + 1, seq + term, n + 1
            per_seq.append(seq / max(n, 1))
    return total / count if averaging == "token" else sum(per_seq) / len(per_seq)


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


@pytest.mark.parametrize("averaging", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo"])
def test_loss_and_gradients_equal_the_paper_s_formula(averaging, kind):
    logp, old, ref, rewards, mask = fixed_batch()
    beta, eps = 0.04, 0.2
    adv = group_advantages(rewards, kind).flatten()
    loss, stats = grpo_loss(logp, old, ref, adv, mask, beta, eps, averaging)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = paper_loss(logp, old, ref, rewards, mask, beta, eps, averaging, kind)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert_close_to_scale(loss, expected, rtol=1e-6)
    assert_close_to_scale(grad, expected_grad, rtol=1e-6)
    assert 0 < stats["clipped_fraction"] < 1  # off-policy ratios do bind the clip here


def test_a_group_whose_rewards_are_all_equal_gives_no_gradient():
    logp, old, ref, rewards, mask = fixed_batch()
    rewards[:] = rewards[0]  # every group: all equal
    adv = group_advantages(rewards).flatten()
    assert torch.equal(adv, torch.zeros_like(adv))
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.0, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.count_nonzero(grad) == 0


def test_two_ranks_give_the_gradients_of_one():
    """What DDP does: each rank's loss over its half, gradients averaged over ranks. With the global token count
    and the world size in the loss, the average is exactly the one-process gradient (token averaging); the same
    for sequence averaging with the global completion count."""
    logp, old, ref, rewards, mask = fixed_batch(seed=1, Q=4)
    adv = group_advantages(rewards).flatten()
    for averaging in ("token", "sequence"):
        full, _ = grpo_loss(logp, old, ref, adv, mask, 0.04, 0.2, averaging)
        (expected,) = torch.autograd.grad(full, logp)
        halves = [slice(0, 8), slice(8, 16)]
        tokens = mask.sum().float()
        grads = torch.zeros_like(logp)
        for part in halves:
            local = logp[part].detach().requires_grad_()
            loss, _ = grpo_loss(local, old[part], ref[part], adv[part], mask[part], 0.04, 0.2, averaging,
                                global_tokens=tokens, global_sequences=16, world_size=2)
            (g,) = torch.autograd.grad(loss, local)
            grads[part] = g / 2  # DDP: the mean over 2 ranks
        assert_close_to_scale(grads, expected, rtol=1e-6)


def test_settings_are_checked():
    for bad in ({"group_size": 1}, {"temperature": 0.0}, {"beta": -1.0}, {"clip_eps": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOConfig(**bad)


def test_the_reward_reads_answers_with_the_test_stage_s_reader(r1_tokenizer):
    """The same reader as the test stage: every rule (a final statement in Spanish, a self-correction, a lone
    choice line) earns the reward exactly where extract_answer reads the gold choice."""
    from medadapt.eval.generative import GenRow, extract_answer
    from medadapt.eval.tasks import Item
    from medadapt.rl.step import rewards_of

    item = Item("q", "0", "", ["A", "B", "C", "D"], 2, "Which?", ["w", "x", "y", "z"])
    replies = ["Thinking.\n</think>\n\nLa respuesta correcta es la C.", "</think>\nThe answer is A. Wait, no: C.",
               "</think>\nC\n\nBecause y.", "</think>\nThe answer is B.", "still thinking", "</think>\nNo idea."]
    rows = [GenRow(item, [1, 2, 3], thinking=True)]
    ids = [r1_tokenizer.encode(t, add_special_tokens=False) for t in replies]
    width = max(len(x) for x in ids)
    completion = torch.tensor([x + [r1_tokenizer.eos_token_id] * (width - len(x)) for x in ids])
    rollout = {"input_ids": torch.cat([torch.ones(len(ids), 3, dtype=torch.long), completion], dim=1),
               "completion_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
               "prompt_width": 3}
    rewards, reads = rewards_of(r1_tokenizer, {"gen_rows": rows}, rollout, GRPOConfig(group_size=len(ids)), len(ids))
    assert rewards.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    assert [float(extract_answer(t, item, True) == 2) for t in replies] == rewards[0].tolist()
    assert [path for _, path in reads] == ["final_statement", "final_statement", "lone_choice_line",
                                           "final_statement", "no_answer", "unparsable"]
