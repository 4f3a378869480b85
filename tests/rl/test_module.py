"""GRPOModule on real (tiny) models: a step's gradient does not depend on its micro-batching, μ = 2 makes the clip
bind, truncated completions leave the loss or are forced, the KL starts at exactly 0 against base + SFT, the
policy moves only with reward, a killed run resumes exactly, what would train the wrong thing is refused, and
the pass-rate filter and dynamic sampling choose the questions they say."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import medadapt.rl.module as rl_module_code
from medadapt.model_config import LoraConfig, ModelConfig
from medadapt.optim import OptimConfig
from medadapt.rl.data import VerifiableQADataModule
from medadapt.rl.grpo import GRPOConfig
from medadapt.rl.module import GRPOModule, RLSetupError

from ..conftest import DATA, SFT_SAMPLE, assert_gradients_close, connect, tiny_trainer
from ..test_module import Crash, Preempted

SMOL = "smollm2-135m-instruct"


def rl_module(path, *, lr=1e-3, base_adapters=None, lora=None, init_adapter=None, **rl):
    rl = {"group_size": 4, "max_new_tokens": 6, "truncation": "keep", "beta": 0.04, "micro_batch_size": 3,
          "validation": {"max_new_tokens": 6, "answer_budget": 0}, **rl}
    return GRPOModule(model=ModelConfig(name_or_path=path, load_in_4bit=False, compute_dtype="float32",
                                        gradient_checkpointing=True, base_adapters=base_adapters),
                      lora=lora if lora is not None or init_adapter else LoraConfig(r=8, alpha=16, dropout=0.0),
                      optim=OptimConfig(lr=lr, warmup_steps=0, fused=False, min_lr_ratio=1.0),
                      init_adapter=init_adapter, rl=GRPOConfig(**rl))


@pytest.fixture(scope="module")
def short_questions(tmp_path_factory) -> dict:
    """24 real o1 questions cut short (fast steps on CPU), as a source mapping."""
    rows = json.load(open(SFT_SAMPLE))[:30]
    out = [{"question": r["question"][:80], "options": r["options"], "answer": r["answer_idx"]}
           for r in rows if len(set(r["options"].values())) == len(r["options"])]
    path = tmp_path_factory.mktemp("rl") / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out[:24]))
    return {"name": "short", "data_files": str(path), "answer_format": "letter"}


def questions(source, **kw):
    kw = {"sources": [source], "benchmarks_dir": str(DATA / "benchmarks"), "heldout": 4, "batch_size": 2,
          "val_batch_size": 2, "decontaminate": False, "open_think": False, **kw}
    return VerifiableQADataModule(**kw)


def parity(completions, rows, tokenizer, cfg):
    """A reward a random tiny model can earn: 1 for a completion whose first token id is even."""
    for c in completions:
        c.reward, c.pred, c.parse = float(c.ids[0] % 2 == 0), None, "parity"


def nothing(completions, rows, tokenizer, cfg):
    for c in completions:
        c.reward, c.pred, c.parse = 0.0, None, "unparsable"


class Record(L.Callback):
    """Each rollout's logged figures, and the gradient at every optimizer step (before clipping)."""

    def __init__(self):
        self.stats, self.grads = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if getattr(module, "last_rl_stats", None) is not None:
            self.stats.append(dict(module.last_rl_stats))
            module.last_rl_stats = None


def run(path, root, steps, source, monkeypatch=None, reward=None, callbacks=(), resume=None, data=None, **kw):
    L.seed_everything(0)
    module = rl_module(path, **kw)
    if reward is not None:
        monkeypatch.setattr(rl_module_code, "reward", reward)
    record = Record()
    trainer = tiny_trainer(root, max_steps=steps, callbacks=[record, *callbacks],
                           enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                           limit_val_batches=0)
    try:
        trainer.fit(module, connect(data or questions(source), module), ckpt_path=resume)
    except Preempted:
        pass
    return module, record


def test_the_step_s_gradient_does_not_depend_on_its_micro_batches(tiny_qwen, tmp_path, monkeypatch, short_questions):
    """One rollout scored in micro-batches of 1 and of 8 completions: the same gradient (one global normaliser)."""
    kw = {"monkeypatch": monkeypatch, "reward": parity, "max_grad_norm": None}
    _, one = run(tiny_qwen, tmp_path / "1", 1, short_questions, micro_batch_size=1, **kw)
    _, eight = run(tiny_qwen, tmp_path / "8", 1, short_questions, micro_batch_size=8, **kw)
    assert one.stats[0]["rl/loss_tokens"] > 0
    assert_gradients_close(one.grads[0], eight.grads[0])


def test_two_updates_per_rollout_reuse_it_off_policy_and_the_clip_binds(tiny_qwen, tmp_path, monkeypatch,
                                                                           short_questions):
    """μ = 2: two optimizer steps per rollout (global_step counts both), the second against the stored π_old, where
    the ratio moves off 1 and the clip binds; with μ = 1 the ratio is exactly 1 and nothing is ever clipped."""
    module, two = run(tiny_qwen, tmp_path / "mu2", 4, short_questions, monkeypatch, parity, lr=0.5,
                      updates_per_batch=2)
    assert module.trainer.global_step == 4 and len(two.stats) == 2 and len(two.grads) == 4
    assert any(s["rl/clipped_fraction_low"] + s["rl/clipped_fraction_high"] > 0 for s in two.stats)
    _, one = run(tiny_qwen, tmp_path / "mu1", 2, short_questions, monkeypatch, parity, lr=0.5)
    assert all(s["rl/clipped_fraction_low"] + s["rl/clipped_fraction_high"] == 0 for s in one.stats)


def test_every_signal_is_logged(tiny_qwen, tmp_path, monkeypatch, short_questions):
    _, record = run(tiny_qwen, tmp_path, 1, short_questions, monkeypatch, parity)
    expected = {"rl/reward_mean", "rl/reward_std", "rl/no_signal_groups", "rl/entropy", "rl/kl",
                "rl/clipped_fraction_low", "rl/clipped_fraction_high", "rl/truncated", "rl/completion_length",
                "rl/completion_length_right", "rl/completion_length_wrong", "rl/generation_s", "rl/update_s",
                "rl/rollout_tokens_per_s", "train/loss", "train/grad_norm", "train/lr"}
    stats = record.stats[0]
    assert expected <= set(stats)
    assert stats["rl/entropy"] > 0 and stats["rl/generation_s"] > 0 and stats["rl/truncated"] == 1.0  # 6 tokens: cut


@pytest.mark.parametrize("truncation", ["mask", "keep"])
def test_truncated_completions_leave_the_loss_when_masked(tiny_qwen, tmp_path, monkeypatch, short_questions,
                                                           truncation):
    """Every completion is cut at 6 tokens here: masked, nothing enters the loss (no update, said in the log); kept,
    all of them do."""
    module, record = run(tiny_qwen, tmp_path, 1, short_questions, monkeypatch, parity, truncation=truncation)
    stats = record.stats[0]
    assert stats["rl/truncated"] == 1.0
    b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    if truncation == "mask":
        assert stats["rl/loss_tokens"] == 0 and all(torch.count_nonzero(p) == 0 for p in b)
    else:
        assert stats["rl/loss_tokens"] == stats["rl/completion_length"] * 8 and any(torch.count_nonzero(p) for p in b)


def test_forced_completions_keep_their_cue_out_of_the_loss(tiny_qwen, r1_tokenizer):
    """``truncation: force``: a cut thought is closed with the test stage's cue and answered; the cue's tokens are in
    the completion (the context) but were not sampled, so they are never scored."""
    from medadapt.eval.generative import FORCED_ANSWER, GenerationConfig, gen_row
    from medadapt.eval.tasks import Item
    from medadapt.rl.rollout import Sampling, sample_hf

    module = rl_module(tiny_qwen)
    module.build_model(training=True)
    item = Item("q", "0", "", ["A", "B", "C", "D"], 1, "Which one?", ["w", "x", "y", "z"])
    row = gen_row(r1_tokenizer, item, GenerationConfig())
    assert row.thinking
    torch.manual_seed(0)
    completions = sample_hf(module.model, r1_tokenizer, [row], 2, Sampling(1.0, 1.0, 0, 5, force_budget=3), "cpu")
    cue = r1_tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)
    for c in completions:
        assert c.truncated and c.forced
        assert c.ids[5 : 5 + len(cue)] == cue and c.sampled[5 : 5 + len(cue)] == [0] * len(cue)
        assert c.sampled[:5] == [1] * 5 and 1 <= sum(c.sampled[5 + len(cue):]) <= 3


def test_the_reference_is_base_plus_sft_and_the_kl_starts_at_zero(tiny_qwen, tmp_path, monkeypatch, short_questions):
    """After SFT the reference keeps the SFT adapter (stacked, frozen) and drops only the fresh RL LoRA; with that LoRA
    fresh (B = 0) policy and reference agree exactly, so the first step's KL is exactly 0 and only the RL LoRA
    trains."""
    from medadapt.weights import write_scaled_adapter

    base = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[])
    write_scaled_adapter(base, tmp_path / "sft", rho=0.05)
    module, record = run(tiny_qwen, tmp_path / "run", 1, short_questions, monkeypatch, parity,
                         base_adapters=[str(tmp_path / "sft")])
    assert record.stats[0]["rl/kl"] == 0.0 and record.stats[0]["rl/loss_tokens"] > 0
    for name, p in module.model.named_parameters():
        assert p.requires_grad == (".default." in name and "lora_" in name), name


def test_with_no_reward_anywhere_the_policy_does_not_move(tiny_qwen, tmp_path, monkeypatch, short_questions):
    module, record = run(tiny_qwen, tmp_path, 3, short_questions, monkeypatch, nothing)
    b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p) == 0 for p in b)  # no advantage, no KL yet: LoRA B never left 0
    assert all(s["train/loss"] == 0.0 and s["rl/no_signal_groups"] == 1.0 for s in record.stats)


def test_steps_that_never_carry_signal_stop_the_run_with_the_reason(tiny_qwen, tmp_path, monkeypatch, short_questions):
    monkeypatch.setattr(rl_module_code, "MAX_EMPTY_STEPS", 2)
    with pytest.raises(RuntimeError, match="2 rollout batches in a row had nothing to learn from"):
        run(tiny_qwen, tmp_path, 5, short_questions, monkeypatch, nothing)


@pytest.mark.slow  # out of the 5-minute fast set; CI runs it
def test_a_killed_run_resumes_with_the_losses_of_an_uninterrupted_one(tiny_qwen, tmp_path, monkeypatch,
                                                                       short_questions):
    kw = {"lr": 5e-2, "monkeypatch": monkeypatch, "reward": parity, "source": short_questions}
    _, full = run(tiny_qwen, tmp_path / "full", 4, **kw)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _, first = run(tiny_qwen, tmp_path / "crash", 4, callbacks=[saver, Crash(2)], **kw)
    _, rest = run(tiny_qwen, tmp_path / "resume", 4, resume=str(tmp_path / "ckpt" / "step=2.ckpt"), **kw)
    assert len(first.stats) == 2 and len(rest.stats) == 2
    keys = ("rl/completion_length", "rl/reward_mean", "train/loss", "rl/kl")
    for a, b in zip(full.stats, first.stats + rest.stats):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    assert any(s["rl/kl"] > 0 for s in full.stats[1:])  # the policy moved: the comparison is not of constants
    assert any(s["rl/reward_std"] > 0 for s in full.stats)


@pytest.mark.slow
def test_dynamic_sampling_waits_for_signal_before_updating(tiny_qwen, tmp_path, monkeypatch, short_questions):
    """A batch whose groups carry no signal is kept waiting (no optimizer step) and topped up from the next one."""
    calls = {"n": 0}

    def signal_from_the_second_batch(completions, rows, tokenizer, cfg):
        calls["n"] += 1
        (nothing if calls["n"] == 1 else parity)(completions, rows, tokenizer, cfg)

    module, record = run(tiny_qwen, tmp_path, 1, short_questions, monkeypatch, signal_from_the_second_batch,
                         dynamic_sampling=True, max_refills=3)
    assert calls["n"] >= 2 and module.trainer.global_step == 1
    stats = record.stats[0]
    assert stats["rl/refills"] >= 1 and stats["rl/no_signal_groups"] > 0  # the waiting batch is in the figures


@pytest.mark.slow
def test_pass_rate_filter_keeps_questions_sometimes_right_and_caches_the_rates(tiny_qwen, tmp_path, monkeypatch,
                                                                               short_questions):
    """Questions answered right by all or none of the samples are dropped before training; a second run reads the
    measured rates from the cache and samples nothing."""
    import medadapt.rl.passrate as passrate

    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))

    def by_question(completions, rows, tokenizer, cfg):  # id % 3: 0 always right, 1 never, 2 half the samples
        for k, c in enumerate(completions):
            item = rows[c.question].item
            right = {0: True, 1: False, 2: k % 2 == 0}[int(item.id) % 3]
            c.pred, c.reward, c.parse = (item.gold if right else (item.gold + 1) % 4), float(right), "x"

    monkeypatch.setattr(passrate, "reward", by_question)
    filter_ = {"samples": 4, "max_new_tokens": 3, "batch_size": 5}
    data = questions(short_questions)
    module, _ = run(tiny_qwen, tmp_path / "a", 1, short_questions, monkeypatch, parity, data=data,
                    pass_rate_filter=filter_)
    kept = {g[0].item.id for g in data.train_rows}
    assert kept and all(int(i) % 3 == 2 for i in kept)
    assert list((tmp_path / "cache" / "rl" / "pass_rates").glob("*.json"))

    def no_sampling(*args, **kw):
        raise AssertionError("the cached rates were not used")

    monkeypatch.setattr(passrate, "measure", no_sampling)
    again = questions(short_questions)
    run(tiny_qwen, tmp_path / "b", 1, short_questions, monkeypatch, parity, data=again, pass_rate_filter=filter_)
    assert {g[0].item.id for g in again.train_rows} == kept


def test_what_would_train_the_wrong_thing_is_refused(tiny_qwen, tmp_path):
    from medadapt.weights import write_scaled_adapter

    with pytest.raises(RLSetupError, match="modules_to_save"):
        rl_module(tiny_qwen, lora=LoraConfig(modules_to_save=["lm_head"], dropout=0.0))
    with pytest.raises(RLSetupError, match="dropout"):
        rl_module(tiny_qwen, lora=LoraConfig(dropout=0.1))
    base = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[])
    write_scaled_adapter(base, tmp_path / "sft", rho=0.05)
    with pytest.raises(RLSetupError, match=r"trained by sft, not RL.*reference .* would be .*no adapter.*base_adapters"):
        rl_module(tiny_qwen, init_adapter=str(tmp_path / "sft"), base_adapters=[])
    module = rl_module(tiny_qwen)
    trainer = tiny_trainer(tmp_path, max_steps=1, gradient_clip_val=1.0)
    with pytest.raises(RLSetupError, match="max_grad_norm"):
        module.check_trainer(trainer)
    with pytest.raises(RLSetupError, match="micro_batch_size"):
        module.check_trainer(tiny_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2))


@pytest.mark.slow
def test_an_rl_adapter_can_be_continued(tiny_qwen, tmp_path, monkeypatch, short_questions):
    """The exported RL adapter says it was trained by RL, so a later run may continue it (its reference stays base +
    the stacked adapters)."""
    from medadapt.provenance import read_adapter_metadata

    module, _ = run(tiny_qwen, tmp_path / "a", 1, short_questions, monkeypatch, parity)
    folder = tmp_path / "a" / "adapter"
    assert read_adapter_metadata(str(folder))["method"] == "rl"
    again = rl_module(tiny_qwen, init_adapter=str(folder), lora=None)
    again.build_model(training=True)
    trained = {n for n, p in again.model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)


@pytest.mark.slow
def test_it_learns_a_task_where_one_option_is_always_right(tmp_path, monkeypatch):
    """SmolLM2, questions whose gold is always B: the probability of answering "B" rises within six GRPO steps (from 0.006
    to 0.95 in twelve, measured at issue 22) (fixed seed); with reward 0 everywhere it stays where it was (exactly: no
    advantage, no gradient)."""
    import dataclasses

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
        module = rl_module(SMOL, lr=5e-3, beta=0.0, group_size=4, max_new_tokens=2, temperature=1.0)
        module.model_cfg = dataclasses.replace(module.model_cfg, gradient_checkpointing=False)
        module.build_model(training=True)
        before = p_b(module)
        if reward is not None:
            monkeypatch.setattr(rl_module_code, "reward", reward)
        data = VerifiableQADataModule(sources=[source], decontaminate=False, heldout=0, open_think=False,
                                      batch_size=2, instruction="Answer with the letter only.")
        tiny_trainer(tmp_path / str(reward is None), max_steps=steps).fit(module, connect(data, module))
        return before, p_b(module)

    before, after = train(6)
    assert after > before + 0.05, (before, after)
    before0, after0 = train(2, nothing)  # no advantage: the update is exactly zero, 2 steps show it
    assert after0 == pytest.approx(before0, abs=1e-6)


@pytest.mark.slow
def test_rl_runs_under_ddp_with_each_rank_sampling_its_own_questions(tiny_qwen, short_questions, tmp_path):
    """Two CPU processes (gloo) through the CLI: every rank samples, rewards and scores its own questions in its own
    micro-batches, gradients meet once per step, the step's statistics are reduced over ranks and the adapter is
    exported once. (That two ranks' gradients equal one process's is the exact test on the loss itself:
    tests/rl/test_grpo.py.)"""
    import csv
    import os
    import subprocess
    import sys

    from ..conftest import REPO

    out = tmp_path / "ddp"
    rl = {"group_size": 2, "max_new_tokens": 4, "truncation": "keep", "micro_batch_size": 1,
          "validation": {"max_new_tokens": 4, "answer_budget": 0}}
    args = [sys.executable, "-m", "medadapt", "fit", "--model", "medadapt.rl.module.GRPOModule",
            "--model.model.name_or_path", tiny_qwen, "--model.model.load_in_4bit", "false",
            "--model.model.compute_dtype", "float32", "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
            "--model.optim.fused", "false", "--model.optim.warmup_steps", "0", "--model.adapter_dir", str(out / "adapter"),
            "--model.rl", json.dumps(rl),
            "--data", "medadapt.rl.data.VerifiableQADataModule", "--data.sources", json.dumps([short_questions]),
            "--data.decontaminate", "false", "--data.heldout", "2", "--data.batch_size", "1", "--data.val_batch_size", "1",
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


def test_resuming_with_another_objective_is_refused(tiny_qwen, tmp_path, monkeypatch, short_questions):
    """A resume optimises what the checkpoint optimised (issue 27: group size, β, temperature and the normalisation
    changed on `--ckpt_path last.ckpt` with only the schedule message)."""
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    run(tiny_qwen, tmp_path / "a", 1, short_questions, monkeypatch, parity, callbacks=[saver])
    with pytest.raises(RLSetupError, match=r"another objective.*rl.temperature 1.0 → 0.3, rl.beta 0.04 → 0.5"):
        run(tiny_qwen, tmp_path / "b", 2, short_questions, monkeypatch, parity, beta=0.5, temperature=0.3,
            resume=str(tmp_path / "ckpt" / "step=1.ckpt"))
