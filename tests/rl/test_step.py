"""The GRPO step on real models: the reference is the policy without its own LoRA, KL starts at exactly 0, the
policy moves only with reward, a killed run resumes exactly, and it learns a verifiable task."""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from medadapt.model import LoraConfig, ModelConfig, load_model
from medadapt.module import CausalLMModule
from medadapt.optim import OptimConfig
from medadapt.rl.data import VerifiableQADataModule
from medadapt.rl.grpo import GRPOConfig, grpo_loss
from medadapt.rl.step import completion_logprobs, reference_policy, sample

from ..conftest import DATA, SFT_SAMPLE, connect, tiny_trainer
from ..test_module import Crash, Preempted

SMOL = "smollm2-135m-instruct"
O1 = {"name": "o1", "data_files": str(SFT_SAMPLE), "options_field": "options", "answer_field": "answer_idx",
      "answer_format": "letter", "on_bad_row": "skip"}


def rl_module(path, *, lr=1e-3, beta=0.04, group=4, tokens=8, dropout=0.0, base_adapters=None, **rl):
    return CausalLMModule(model=ModelConfig(name_or_path=path, load_in_4bit=False, compute_dtype="float32",
                                            gradient_checkpointing=True, base_adapters=base_adapters),
                          lora=LoraConfig(r=8, alpha=16, dropout=dropout),
                          optim=OptimConfig(lr=lr, warmup_steps=0, fused=False),
                          rl=GRPOConfig(group_size=group, max_new_tokens=tokens, eval_max_new_tokens=tokens, beta=beta,
                                        **rl))


@pytest.fixture(scope="module")
def short_questions(tmp_path_factory) -> dict:
    """24 real o1 questions cut short (fast steps on CPU), as a source mapping."""
    rows = json.load(open(SFT_SAMPLE))[:30]
    out = [{"question": r["question"][:80], "options": r["options"], "answer": r["answer_idx"]}
           for r in rows if len(set(r["options"].values())) == len(r["options"])]
    path = tmp_path_factory.mktemp("rl") / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out[:24]))
    return {"name": "short", "data_files": str(path), "answer_format": "letter"}


def o1_data(**kw):
    kw = {"sources": [O1], "benchmarks_dir": str(DATA / "benchmarks"), "heldout": 4, "batch_size": 2,
          "max_questions": 24, "open_think": False, "decontaminate": False, **kw}
    return VerifiableQADataModule(**kw)


def batch_of(data, module, n=2):
    connect(data, module)
    data.setup("fit")
    from medadapt.eval.generative import collate_generate

    return collate_generate(data.train_rows[:n], pad_id=module.tokenizer.pad_token_id)


def test_decontamination_drops_the_questions_copied_from_the_leaderboard(r1_tokenizer, caplog):
    data = o1_data(max_questions=None, heldout=0, decontaminate=True)
    data.connect(r1_tokenizer)
    with caplog.at_level("WARNING"):
        data.setup("fit")
    assert "dropped 3 of" in caplog.text and "o1 → medmcqa: 3" in caplog.text  # the three MedMCQA copies
    assert "options A and B are the same text" in caplog.text  # a malformed row of the sample, counted
    assert all(0 <= r.item.gold < len(r.item.options) for (r,) in data.train_rows) and len(data.train_rows) > 150


def test_the_reference_is_the_policy_without_its_own_lora_and_kl_starts_at_zero(tiny_qwen, tmp_path,
                                                                                  short_questions):
    """After SFT the reference keeps the SFT adapter (stacked, frozen) and drops only the fresh RL LoRA; with that
    LoRA fresh (B = 0), policy and reference log-probabilities are identical, so the k3 KL is exactly 0."""
    from medadapt.weights import write_scaled_adapter

    base = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[])
    write_scaled_adapter(base, tmp_path / "sft", rho=0.05)
    torch.manual_seed(0)
    module = rl_module(tiny_qwen, base_adapters=[str(tmp_path / "sft")])
    module.build_model(training=True)
    batch = batch_of(o1_data(sources=[short_questions]), module)
    rollout = sample(module.model, module.tokenizer, batch, module.rl_cfg)
    logp = completion_logprobs(module.model, rollout)
    with torch.no_grad(), reference_policy(module.model):
        ref = completion_logprobs(module.model, rollout)
    assert torch.equal(logp.detach(), ref)
    mask = rollout["completion_mask"]
    _, stats = grpo_loss(logp, logp.detach(), ref, torch.ones(mask.shape[0]), mask, 0.04, 0.2)
    assert stats["kl"].item() == 0.0
    # the reference is base + SFT adapter: not the raw base
    plain = load_model(base, training=False)
    with torch.no_grad():
        raw = completion_logprobs(plain, rollout)
    assert not torch.allclose(raw, ref, atol=1e-4)
    for name, p in module.model.named_parameters():  # trained: the fresh LoRA only
        assert p.requires_grad == (".default." in name and "lora_" in name), name


def run_rl(path, root, steps, source, monkeypatch=None, reward=None, crash_at=None, ckpt=None, resume=None, **kw):
    L.seed_everything(0)
    module = rl_module(path, **kw)
    data = o1_data(sources=[source])
    if reward is not None:
        import medadapt.rl.step as step

        monkeypatch.setattr(step, "rewards_of", reward)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(outputs["loss"]), dict(pl_module.last_rl_stats)))

    callbacks = [Record()] + ([ckpt] if ckpt else []) + ([Crash(crash_at)] if crash_at is not None else [])
    trainer = tiny_trainer(root, max_steps=steps, callbacks=callbacks, enable_checkpointing=ckpt is not None,
                           limit_val_batches=0)
    try:
        trainer.fit(module, connect(data, module), ckpt_path=resume)
    except Preempted:
        pass
    return module, losses


def test_with_no_reward_anywhere_the_policy_does_not_move(tiny_qwen, tmp_path, monkeypatch, short_questions):
    def nothing(tokenizer, batch, rollout, cfg, group):
        return torch.zeros(len(batch["gen_rows"]), group), [(None, "unparsable")] * (len(batch["gen_rows"]) * group)

    module, losses = run_rl(tiny_qwen, tmp_path, 3, short_questions, monkeypatch, reward=nothing, beta=0.04, tokens=4)
    b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p) == 0 for p in b)  # no advantage, no KL yet: LoRA B never left 0
    assert all(loss == 0.0 for loss, _ in losses)


def parity(tokenizer, batch, rollout, cfg, group):
    """A reward that a random tiny model can earn: 1 for a completion whose first token id is even."""
    first = rollout["input_ids"][:, rollout["prompt_width"]]
    n = len(batch["gen_rows"]) * group
    return (first % 2 == 0).float().view(-1, group), [(None, "unparsable")] * n


def test_a_killed_run_resumes_with_the_losses_of_an_uninterrupted_one(tiny_qwen, tmp_path, monkeypatch, short_questions):
    kw = {"lr": 5e-2, "dropout": 0.1, "tokens": 4, "monkeypatch": monkeypatch, "reward": parity,
          "source": short_questions}
    _, full = run_rl(tiny_qwen, tmp_path / "full", 4, **kw)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _, first = run_rl(tiny_qwen, tmp_path / "crash", 4, ckpt=saver, crash_at=2, **kw)
    _, rest = run_rl(tiny_qwen, tmp_path / "resume", 4, resume=str(tmp_path / "ckpt" / "step=2.ckpt"), **kw)
    assert len(first) == 2 and len(rest) == 2
    assert [s["completion_length"] for _, s in full] == [s["completion_length"] for _, s in first + rest]
    assert [loss for loss, _ in full] == pytest.approx([loss for loss, _ in first + rest], rel=1e-6, abs=1e-9)
    assert any(s["kl"] > 0 for _, s in full[1:])  # the policy moved: the comparison is not of constants
    assert any(s["reward_std"] > 0 for _, s in full)


@pytest.mark.slow
def test_it_learns_a_task_where_one_option_is_always_right(tmp_path, monkeypatch):
    """SmolLM2, questions whose gold is always B: the probability of answering "B" rises within six GRPO steps (from 0.006 to 0.95 in twelve, measured)
    (fixed seed); with reward 0 everywhere it stays where it was (exactly: no advantage, no gradient)."""
    rows = [{"question": f"Case {i}: which of these is the right one?", "options": ["w", "x", "y", "z"],
             "answer": "B"} for i in range(40)]
    path = tmp_path / "always_b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"name": "always_b", "data_files": str(path), "answer_format": "letter"}

    def p_b(module):
        from medadapt.eval.generative import collate_generate

        data = VerifiableQADataModule(sources=[source], decontaminate=False, heldout=0, open_think=False)
        connect(data, module)
        data.setup("fit")
        batch = collate_generate(data.train_rows[:8], pad_id=module.tokenizer.pad_token_id)
        b = module.tokenizer.encode("B", add_special_tokens=False)[0]
        with torch.no_grad():
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
        return torch.softmax(logits.float(), -1)[:, b].mean().item()

    def train(steps, reward=None):
        L.seed_everything(0)
        module = rl_module(SMOL, lr=5e-3, beta=0.0, group=4, tokens=2)
        module.model_cfg = dataclasses.replace(module.model_cfg, gradient_checkpointing=False)
        module.build_model(training=True)
        before = p_b(module)
        if reward is not None:
            import medadapt.rl.step as step

            monkeypatch.setattr(step, "rewards_of", reward)
        data = VerifiableQADataModule(sources=[source], decontaminate=False, heldout=0, open_think=False,
                                      batch_size=2, instruction="Answer with the letter only.")
        tiny_trainer(tmp_path / str(reward is None), max_steps=steps).fit(module, connect(data, module))
        return before, p_b(module)

    before, after = train(6)
    assert after > before + 0.05, (before, after)

    def nothing(tokenizer, batch, rollout, cfg, group):
        return torch.zeros(len(batch["gen_rows"]), group), [(None, "unparsable")] * (len(batch["gen_rows"]) * group)

    before0, after0 = train(2, nothing)  # no advantage: the update is exactly zero, 2 steps show it
    assert after0 == pytest.approx(before0, abs=1e-6)


@pytest.mark.slow
def test_rl_runs_under_ddp_with_each_rank_sampling_its_own_questions(tiny_qwen, short_questions, tmp_path):
    """Two CPU processes (gloo) through the CLI: every rank samples, rewards and scores its own questions; the
    step's statistics are reduced over ranks and the adapter is exported once. (That two ranks' gradients equal
    one process's on the same completions is the exact test above, on the loss itself.)"""
    import csv
    import os
    import subprocess
    import sys

    from ..conftest import REPO

    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "medadapt", "fit", "--model.model.name_or_path", tiny_qwen,
            "--model.model.load_in_4bit", "false", "--model.model.compute_dtype", "float32",
            "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}), "--model.optim.fused", "false",
            "--model.optim.warmup_steps", "0", "--model.adapter_dir", str(out / "adapter"),
            "--model.rl", json.dumps({"group_size": 2, "max_new_tokens": 4, "eval_max_new_tokens": 4}),
            "--data", "medadapt.rl.data.VerifiableQADataModule", "--data.sources", json.dumps([short_questions]),
            "--data.decontaminate", "false", "--data.heldout", "2", "--data.batch_size", "1",
            "--data.open_think", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    assert [int(r["step"]) for r in rows if r.get("rl/reward_mean")] == [1, 2]
    assert any(r.get("val/heldout_acc") for r in rows)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
