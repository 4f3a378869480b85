"""RL rollouts from a running vLLM engine: it serves the policy as it is after each update (a fresh LoRARequest per
update, only the latest adapter folder kept), token for token what the HF policy generates (fp32, greedy); sampled
at T = 0.6 its own log-probabilities are the trainer's scores of the same tokens (importance weights ≈ 1); and a
GRPO step runs on its rollouts."""

from __future__ import annotations

import json

import pytest
import torch

from ..eval.test_vllm import SMOL, have_vllm
from .test_module import rl_module

pytestmark = pytest.mark.slow


def o1_source(tmp_path, monkeypatch, n: int, cut: int) -> dict:
    """vLLM available, its caches in ``tmp_path``, and ``n`` o1 questions cut to ``cut`` characters as a source."""
    from ..conftest import SFT_SAMPLE

    have_vllm(monkeypatch)
    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"][:cut], "options": r["options"],
                                        "answer": r["answer_idx"]}) + "\n" for r in json.load(open(SFT_SAMPLE))[:n]))
    return {"name": "q", "data_files": str(path), "answer_format": "letter", "on_bad_row": "skip"}


def test_a_grpo_step_runs_on_vllm_rollouts_and_the_engine_follows_the_policy(tmp_path, monkeypatch):
    """One engine for the whole check (each start costs ~30 s on CPU): a GRPO step on its rollouts (SmolLM2: vLLM's
    CPU attention needs head_dim ≥ 32) logs importance weights near 1; then the policy changes twice and the engine's
    greedy completions are HF's token for token, with only the latest adapter folder kept; sampled at T = 0.6 its
    log-probabilities are the trainer's scores of the same tokens."""
    from medadapt.eval.generative import collate_generate
    from medadapt.rl.rollout import Sampling
    from medadapt.rl.scoring import collate_scoring, completion_logprobs

    from .test_module import parity, questions, run

    source = o1_source(tmp_path, monkeypatch, 8, 80)
    module, record = run(SMOL, tmp_path / "run", 1, source, monkeypatch, parity, backend="vllm", enforce_eager=True,
                         max_new_tokens=6, data=questions(source, heldout=0))
    sampler = module.sampler
    try:
        stats = record.stats[0]
        assert stats["rl/loss_tokens"] > 0 and 0.9 < stats["rl/importance_weight"] < 1.1

        batch = collate_generate(module.trainer.datamodule.train_rows[:3], pad_id=module.tokenizer.pad_token_id)
        gen_rows = batch["gen_rows"]
        for update in range(2):  # the policy changes; the engine must follow it
            for name, p in module.model.named_parameters():
                if "lora_B" in name and ".default." in name:
                    p.data.normal_(0, 0.05 * (update + 1))
            greedy = sampler.sample(gen_rows, 1, Sampling(0.0, 1.0, 0, 6), seed=0)
            module.model.eval()
            with torch.no_grad():
                hf = module.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           max_new_tokens=6, do_sample=False,
                                           pad_token_id=module.tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
            eos = module.tokenizer.eos_token_id
            for got, want in zip(greedy, hf.tolist()):
                want = want[: want.index(eos) + 1] if eos in want else want
                assert [t for t in got.ids if t != eos] == [t for t in want if t != eos]
            assert [p.name for p in sampler.server.dir.glob("policy*")] == [sampler.sent.name]  # the latest only
        sampled = sampler.sample(gen_rows, 2, Sampling(0.6, 1.0, 0, 6), seed=1)
        scoring = collate_scoring([c.prompt for c in sampled], [c.ids for c in sampled], [c.sampled for c in sampled],
                                  module.tokenizer.pad_token_id, [c.sampler_logp for c in sampled])
        with torch.no_grad():
            trainer_logp, _ = completion_logprobs(module.model, scoring, 0.6)
        known = scoring["score_mask"].bool() & ~torch.isnan(scoring["sampler_logp"])
        assert known.sum() > 10
        diff = (trainer_logp - scoring["sampler_logp"])[known]
        assert diff.abs().max() < 1e-3  # fp32 on both sides: importance weights ≈ 1
    finally:
        sampler.close()
