"""One GRPO step inside ``CausalLMModule.training_step`` (``model.rl`` set): sample, reward, score, loss.

1. **Sample** G completions per question from the current policy: with HF ``generate`` (eval mode, no dropout,
   KV cache on, activation checkpointing idle: it only acts in training mode), or with a vLLM engine kept running
   beside training that gets the policy's LoRA anew after every update (``rl.backend: vllm``); the prompts are
   the test stage's generative prompts, left-padded.
2. **Reward** each completion with the test stage's own reader (``eval.generative.read_reply``): 1 when it reads
   the gold choice, else 0 (an unparsable reply, or a thought never closed, is 0), plus ``format_reward`` for a
   closed, readable reply when configured.
3. **Score** the completion tokens: log-probabilities under the policy (train mode, with gradients) and under the
   reference, which is the same model with its own LoRA (``default``) switched off: after SFT that is base +
   the frozen SFT adapter. No second copy of the model exists.
4. **Loss**: ``grpo.grpo_loss`` with group-relative advantages, the global token count under DDP.

Only completion tokens are scored, and the LM head runs on those positions only.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from medadapt.eval.generative import read_reply
from medadapt.model import unwrapped
from medadapt.rl.grpo import GRPOConfig, group_advantages, grpo_loss


@contextmanager
def reference_policy(model):
    """The model with its trained LoRA (``default``) off and any adapters stacked under it still on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    try:
        for m, active in zip(layers, saved):
            m._active_adapter = [a for a in ([active] if isinstance(active, str) else active) if a != "default"]
        yield model
    finally:
        for m, active in zip(layers, saved):
            m._active_adapter = active


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


@torch.no_grad()
def sample(model, tokenizer, batch: dict, cfg: GRPOConfig, greedy: bool = False) -> dict:
    """``group_size`` completions per prompt (1 when ``greedy``): prompt + completion ids, attention mask, and the
    completion-token mask (EOS included, padding after it excluded)."""
    group = 1 if greedy else cfg.group_size
    ids = batch["input_ids"].repeat_interleave(group, dim=0)
    mask = batch["attention_mask"].repeat_interleave(group, dim=0)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
    with generating(model):
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             max_new_tokens=cfg.eval_max_new_tokens if greedy else cfg.max_new_tokens, **sampling)
    completion = out[:, ids.shape[1]:]
    is_eos = completion == tokenizer.eos_token_id
    ended = is_eos.cumsum(dim=1) - is_eos.long()  # EOS tokens before this one
    return rollout_of(batch, group, completion, (ended == 0).long())  # up to and including the first EOS


def rollout_of(batch: dict, group: int, completion: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """The prompts (each repeated ``group`` times, left-padded) with their completions: ids, attention mask, the
    completion-token mask and where completions start."""
    ids = batch["input_ids"].repeat_interleave(group, dim=0)
    mask = batch["attention_mask"].repeat_interleave(group, dim=0)
    return {"input_ids": torch.cat([ids, completion], dim=1), "attention_mask": torch.cat([mask, completion_mask], 1),
            "completion_mask": completion_mask, "prompt_width": ids.shape[1]}


def policy_server(module):
    """The vLLM engine serving this run's policy (started once): the base with the adapters stacked under the policy
    merged into it (``served_weights``), the policy's own LoRA sent with each request."""
    if getattr(module, "_vllm_server", None) is None:
        from medadapt.eval import vllm_backend
        from medadapt.model import resolve_dtype

        cfg, rl = module.resolved_model_cfg, module.rl_cfg
        dtype = str(resolve_dtype(cfg.compute_dtype)).removeprefix("torch.")
        model_dir, _ = vllm_backend.served_weights(cfg, None, dtype)
        engine = {"model": model_dir, "tokenizer": model_dir, "dtype": dtype, "sampling": {"seed": 0},
                  "lora": {"rank": module.lora_used.r}, "enforce_eager": rl.enforce_eager,
                  "engine_args": rl.vllm_engine_args, "max_model_len": module.rl_max_model_len}
        module._vllm_server = vllm_backend.VLLMServer(vllm_backend.vllm_python(rl.vllm_python), engine)
    return module._vllm_server


@torch.no_grad()
def sample_vllm(module, batch: dict, cfg: GRPOConfig) -> dict:
    """The rollouts of ``sample``, generated by vLLM with the policy as it is now: its LoRA saved and sent under a
    new id (vLLM caches adapters by id). The seed comes from the run's RNG, so a resumed run draws the same."""
    server = policy_server(module)
    tokenizer = module.tokenizer
    adapter = server.dir / f"policy{server.requests + 1}"
    module.model.save_pretrained(str(adapter), selected_adapters=["default"])
    rows = batch["gen_rows"]
    request = {"prompts": [r.input_ids for r in rows], "thinking": [r.thinking for r in rows],
               "eos": [tokenizer.eos_token_id], "force": {},
               "sampling": {"n": cfg.group_size, "temperature": cfg.temperature, "top_p": cfg.top_p,
                            "seed": int(torch.randint(2**31 - 1, (1,))), "max_tokens": cfg.max_new_tokens},
               "lora": {"path": str(adapter), "rank": module.lora_used.r, "id": server.requests + 1,
                        "name": f"policy{server.requests + 1}"}}
    response = server.generate(request)
    completions = []
    for samples in response["outputs"]:
        for sample_ in samples:
            ids = list(sample_["ids"])
            if sample_["finished"] and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)  # scored like HF's: up to and including EOS
            completions.append(ids)
    width = max(1, max(len(c) for c in completions))
    device = batch["input_ids"].device
    completion = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, ids in enumerate(completions):
        completion[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[i, : len(ids)] = 1
    return rollout_of(batch, cfg.group_size, completion.to(device), completion_mask.to(device))


def rewards_of(tokenizer, batch: dict, rollout: dict, cfg: GRPOConfig, group: int) -> tuple[torch.Tensor, list]:
    """(Q, group) rewards from the test stage's reader, and each completion's (prediction, parse path)."""
    rows = [r for r in batch["gen_rows"] for _ in range(group)]
    width = rollout["prompt_width"]
    values, reads = [], []
    for row, ids, keep in zip(rows, rollout["input_ids"][:, width:].tolist(), rollout["completion_mask"].tolist()):
        text = tokenizer.decode([t for t, k in zip(ids, keep) if k], skip_special_tokens=True)
        pred, path = read_reply(text, row.item, row.thinking)
        reward = float(pred == row.item.gold)
        if cfg.format_reward and pred is not None:
            reward += cfg.format_reward
        values.append(reward)
        reads.append((pred, path))
    return torch.tensor(values, dtype=torch.float32).view(-1, group), reads


def completion_logprobs(model, rollout: dict) -> torch.Tensor:
    """(N, T) log-probabilities of the completion tokens under ``model`` (positions from the attention mask, as
    ``generate`` numbers them; the LM head only on completion positions)."""
    ids, mask = rollout["input_ids"], rollout["attention_mask"]
    width, keep = rollout["prompt_width"], rollout["completion_mask"]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    base = unwrapped(model)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
    hidden = hidden[:, width - 1 : -1]  # position t predicts token t + 1
    rows, cols = keep.nonzero(as_tuple=True)
    logits = base.get_output_embeddings()(hidden[rows, cols]).float()
    targets = ids[:, width:][rows, cols]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    out = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device)
    return out.index_put((rows, cols), picked)


def grpo_step(module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one batch of questions, and the step's statistics (for the logs)."""
    cfg: GRPOConfig = module.rl_cfg
    model, tokenizer = module.model, module.tokenizer
    rollout = sample(model, tokenizer, batch, cfg) if cfg.backend == "hf" else sample_vllm(module, batch, cfg)
    rewards, reads = rewards_of(tokenizer, batch, rollout, cfg, cfg.group_size)
    rewards = rewards.to(rollout["input_ids"].device)
    advantages = group_advantages(rewards, cfg.advantage, cfg.std_eps).flatten()
    logp = completion_logprobs(model, rollout)
    with torch.no_grad(), reference_policy(model):
        ref_logp = completion_logprobs(model, rollout)
    mask = rollout["completion_mask"]
    strategy = module.trainer.strategy if module._trainer is not None else None
    world = strategy.world_size if strategy is not None else 1
    tokens = mask.sum().to(torch.float32)
    if world > 1:
        tokens = strategy.reduce(tokens, reduce_op="sum")
    loss, stats = grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, cfg.beta, cfg.clip_eps, cfg.averaging,
                            global_tokens=tokens, global_sequences=mask.shape[0] * world, world_size=world)
    same = (rewards.max(dim=1).values == rewards.min(dim=1).values).float()
    stats.update({"reward_mean": rewards.mean(), "reward_std": rewards.std(dim=1, unbiased=False).mean(),
                  "no_signal_groups": same.mean(), "completion_length": mask.sum(dim=1).float().mean(),
                  "unparsable": torch.tensor(sum(p is None for p, _ in reads) / len(reads), device=rewards.device)})
    return loss, {k: v.detach().float() for k, v in stats.items()}


@torch.no_grad()
def heldout_correct(module, batch: dict) -> tuple[int, int]:
    """(right, asked) of greedy answers to held-out questions, read by the test stage's reader."""
    rollout = sample(module.model, module.tokenizer, batch, module.rl_cfg, greedy=True)
    rewards, reads = rewards_of(module.tokenizer, batch, rollout, module.rl_cfg, 1)
    right = sum(int(p == r.item.gold) for (p, _), r in zip(reads, batch["gen_rows"]))
    return right, len(reads)
