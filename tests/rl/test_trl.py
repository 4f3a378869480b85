"""medadapt's GRPO step against TRL's GRPOTrainer, on the same tiny model, completions and rewards.

TRL runs its own ``train()`` (generation batch buffered, split into micro-batches, gradient accumulation, μ
iterations); its completions come from a fixed ``rollout_func`` and its rewards from a fixed table, and a callback
records the gradients at every optimizer step. medadapt scores the same completions through its own path
(``rl.scoring`` chunked log-probs at the temperature, ``rl.grpo`` terms, one global normaliser, micro-batches of
another size) and steps the same AdamW. Where the conventions are the same the gradients must be equal to fp32
precision of their scale; where medadapt differs on purpose (``no_signal: drop``) the difference is pinned exactly.

Conventions compared (TRL ``loss_type`` ↔ medadapt ``averaging``): ``dapo`` ↔ ``token``, ``grpo`` ↔ ``sequence``,
``dr_grpo`` ↔ ``constant``; ``scale_rewards`` and Bessel's std, ``use_bias_correction_kl`` ↔ ``kl_ratio_weight``,
``epsilon_high`` ↔ ``clip_eps_high``, ``num_iterations`` ↔ ``updates_per_batch``, ``mask_truncated_completions`` ↔
``truncation: mask``.
"""

from __future__ import annotations

import pytest
import torch

from medadapt.rl.grpo import GRPOConfig, group_advantages, normaliser
from medadapt.rl.module import backprop
from medadapt.rl.scoring import collate_scoring, completion_logprobs, reference_policy

from ..conftest import assert_gradients_close

pytest.importorskip("trl")
Q, G, MAX_NEW = 2, 4, 8
LR = 2e-2


def fixed_rollout(tokenizer, seed: int = 0, truncated: bool = False):
    """Q prompts of equal length (no padding: both sides number positions alike), G completions each ending in EOS
    (or, with ``truncated``, one cut at MAX_NEW without EOS), rewards with signal in every group."""
    g = torch.Generator().manual_seed(seed)
    prompts = {f"q{i}": torch.randint(100, 5000, (5,), generator=g).tolist() for i in range(Q)}
    lengths = torch.randint(2, 7, (Q, G), generator=g).tolist()
    completions = {f"q{i}": [torch.randint(100, 5000, (lengths[i][k],), generator=g).tolist() + [tokenizer.eos_token_id]
                             for k in range(G)] for i in range(Q)}
    if truncated:
        completions["q1"][2] = torch.randint(100, 5000, (MAX_NEW,), generator=g).tolist()
    rewards = {"q0": [1.0, 0.0, 0.0, 1.0], "q1": [0.0, 1.0, 0.0, 0.0]}
    return prompts, completions, rewards


def trl_gradients(model_dir, tokenizer, rollout, *, loss_type, scale_rewards, temperature, beta, iterations,
                  eps_high=None, mask_truncated=False, tmp_path):
    """TRL's GRPOTrainer.train() on the fixed rollout: the gradients at each optimizer step, and its initial LoRA."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    prompts, completions, rewards = rollout

    def rollout_func(batch_prompts, trainer):
        out, seen = {"prompt_ids": [], "completion_ids": [], "logprobs": []}, {}
        for p in batch_prompts:
            k = seen[p] = seen.get(p, -1) + 1
            out["prompt_ids"].append(prompts[p])
            out["completion_ids"].append(completions[p][k])
            out["logprobs"].append([0.0] * len(completions[p][k]))
        return out

    def reward_func(prompts, completions, completion_ids, **kw):
        return [rewards[p][rollout[1][p].index(list(ids))] for p, ids in zip(prompts, completion_ids)]

    grads = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_generations=G, max_completion_length=MAX_NEW, temperature=temperature, top_k=0, beta=beta,
                     loss_type=loss_type, scale_rewards=scale_rewards, epsilon=0.2, epsilon_high=eps_high,
                     num_iterations=iterations, learning_rate=LR, max_steps=iterations, lr_scheduler_type="constant",
                     warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, report_to=[], use_cpu=True,
                     bf16=False, gradient_checkpointing=False, seed=0, save_strategy="no", shuffle_dataset=False,
                     mask_truncated_completions=mask_truncated, use_bias_correction_kl=True, disable_dropout=True)
    trainer = GRPOTrainer(model=base, reward_funcs=reward_func, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": list(prompts)}), rollout_func=rollout_func,
                          peft_config=PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"), callbacks=[Record()])
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    return grads, start


def medadapt_gradients(model_dir, rollout, start: dict, cfg: GRPOConfig, micro: int = 3):
    """medadapt's path on the same rollout from the same LoRA: gradients at each of μ optimizer steps."""
    from medadapt.model import load_model
    from medadapt.model_config import LoraConfig, ModelConfig

    prompts, completions, rewards = rollout
    model = load_model(ModelConfig(name_or_path=model_dir, load_in_4bit=False, compute_dtype="float32",
                                   gradient_checkpointing=False, base_adapters=[]),
                       LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), training=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in start.items():
            params[n].copy_(value)
    table = torch.tensor([rewards[p] for p in prompts])  # (Q, G), questions in order
    advantages = group_advantages(table, cfg.scale_rewards, cfg.std_eps).flatten().tolist()
    kept = [(prompts[p], c, a) for (p, c), a in zip([(p, c) for p in prompts for c in completions[p]], advantages)]
    if cfg.no_signal == "drop":
        signal = [bool(table[i].max() != table[i].min()) for i in range(Q)]
        kept = [k for i, k in enumerate(kept) if signal[i // G]]
    if cfg.truncation == "mask":
        kept = [k for k in kept if k[1][-1] == model.config.eos_token_id]
    batches = []
    for i in range(0, len(kept), micro):
        part = kept[i : i + micro]
        b = collate_scoring([p for p, _, _ in part], [c for _, c, _ in part], [[1] * len(c) for _, c, _ in part], 0)
        b["advantages"] = torch.tensor([a for _, _, a in part])
        batches.append(b)
    tokens = sum(len(c) for _, c, _ in kept)
    norm = normaliser(cfg, tokens, len(kept))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    with torch.no_grad():
        old = [completion_logprobs(model, b, cfg.temperature)[0] for b in batches] if cfg.updates_per_batch > 1 else None
        ref = None
        if cfg.beta > 0:
            with reference_policy(model):
                ref = [completion_logprobs(model, b, cfg.temperature)[0] for b in batches]
    grads = []
    for _ in range(cfg.updates_per_batch):
        backprop(model, batches, cfg, norm, 1, old, ref)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads


LOSS_TYPES = {"dapo": "token", "grpo": "sequence", "dr_grpo": "constant"}


def compare(tiny_qwen, r1_tokenizer, tmp_path, loss_type, scale_rewards, temperature, beta, iterations, **kw):
    rollout = fixed_rollout(r1_tokenizer, truncated=kw.get("mask_truncated", False))
    trl, start = trl_gradients(tiny_qwen, r1_tokenizer, rollout, loss_type=loss_type, scale_rewards=scale_rewards,
                               temperature=temperature, beta=beta, iterations=iterations, tmp_path=tmp_path,
                               eps_high=kw.get("eps_high"), mask_truncated=kw.get("mask_truncated", False))
    cfg = GRPOConfig(averaging=LOSS_TYPES[loss_type], scale_rewards=scale_rewards, temperature=temperature, beta=beta,
                     updates_per_batch=iterations, no_signal="keep", max_new_tokens=MAX_NEW,
                     truncation="mask" if kw.get("mask_truncated") else "keep", clip_eps_high=kw.get("eps_high"))
    ours = medadapt_gradients(tiny_qwen, rollout, start, cfg)
    assert len(trl) == len(ours) == iterations
    for step, (a, b) in enumerate(zip(trl, ours)):
        assert set(a) == set(b)
        assert_gradients_close(b, a, msg=f"step {step + 1}")
    return trl, ours


def test_off_policy_step_at_temperature_with_kl_equals_trl_dapo(tiny_qwen, r1_tokenizer, tmp_path):
    """The default conventions (token normalisation over the generation batch, group std, ratio-weighted k3) at
    T = 0.6 and β > 0, on-policy (first step) and off-policy (second step: the ratio ≠ 1, the clip binds)."""
    compare(tiny_qwen, r1_tokenizer, tmp_path, "dapo", "group", 0.6, 0.04, 2, eps_high=0.28)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,scale_rewards", [("dapo", "group"), ("grpo", "batch"), ("dr_grpo", "none")])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("iterations", [1, 2])
def test_every_shared_convention_equals_trl(tiny_qwen, r1_tokenizer, tmp_path, loss_type, scale_rewards, temperature,
                                            beta, iterations):
    compare(tiny_qwen, r1_tokenizer, tmp_path, loss_type, scale_rewards, temperature, beta, iterations)


@pytest.mark.slow
def test_masked_truncation_equals_trl_mask_truncated_completions(tiny_qwen, r1_tokenizer, tmp_path):
    compare(tiny_qwen, r1_tokenizer, tmp_path, "dapo", "group", 1.0, 0.0, 1, mask_truncated=True)


@pytest.mark.slow
def test_dropping_groups_without_signal_differs_from_trl_by_the_normaliser_alone(tiny_qwen, r1_tokenizer, tmp_path):
    """medadapt's default ``no_signal: drop`` takes a group whose rewards are all equal out of the loss and of the token
    count; TRL keeps it. With β = 0 that group's terms are zero either way, so the gradients differ exactly by the
    normaliser: grad(drop) = grad(TRL) × tokens(all) / tokens(groups with signal)."""
    prompts, completions, rewards = fixed_rollout(r1_tokenizer)
    rewards = dict(rewards, q1=[1.0] * G)  # q1: no signal
    rollout = (prompts, completions, rewards)
    trl, start = trl_gradients(tiny_qwen, r1_tokenizer, rollout, loss_type="dapo", scale_rewards="group",
                               temperature=0.6, beta=0.0, iterations=1, tmp_path=tmp_path)
    cfg = GRPOConfig(averaging="token", temperature=0.6, beta=0.0, no_signal="drop", truncation="keep")
    (ours,) = medadapt_gradients(tiny_qwen, rollout, start, cfg)
    ratio = sum(len(c) for p in prompts for c in completions[p]) / sum(len(c) for c in completions["q0"])
    assert ratio > 1
    assert_gradients_close(ours, {name: g * ratio for name, g in trl[0].items()}, msg="no_signal: drop")
