"""RL rollouts from a running vLLM engine: it serves the policy as it is after each update (a fresh LoRARequest
per update), token for token what the HF policy generates (fp32, greedy), and one GRPO step runs on them."""

from __future__ import annotations

import json

import pytest
import torch

from ..eval.test_vllm import SMOL, have_vllm
from .test_step import rl_module

pytestmark = pytest.mark.slow


def test_the_engine_serves_the_current_lora_after_every_update(tmp_path, monkeypatch):
    from medadapt.eval.generative import collate_generate
    from medadapt.rl.data import VerifiableQADataModule
    from medadapt.rl.step import policy_server, sample_vllm
    from medadapt.rl.step import grpo_step

    from ..conftest import SFT_SAMPLE

    have_vllm(monkeypatch)
    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    rows = json.load(open(SFT_SAMPLE))[:6]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"][:120], "options": r["options"],
                                        "answer": r["answer_idx"]}) + "\n" for r in rows))
    torch.manual_seed(0)
    module = rl_module(SMOL, tokens=8, group=2, backend="vllm", enforce_eager=True)
    module.build_model(training=True)
    module.max_prompt_tokens = 512
    data = VerifiableQADataModule(sources=[{"name": "q", "data_files": str(path), "answer_format": "letter"}],
                                  decontaminate=False, heldout=0, open_think=False)
    data.connect(module.tokenizer)
    data.setup("fit")
    batch = collate_generate(data.train_rows[:3], pad_id=module.tokenizer.pad_token_id)
    server = policy_server(module)
    try:
        for update in range(2):  # the policy changes; the engine must follow it
            for name, p in module.model.named_parameters():
                if "lora_B" in name and ".default." in name:
                    p.data.normal_(0, 0.05 * (update + 1))
            adapter = tmp_path / f"policy{update}"
            module.model.save_pretrained(str(adapter), selected_adapters=["default"])
            response = server.generate({
                "prompts": [r.input_ids for r in batch["gen_rows"]], "thinking": [False] * 3, "force": {},
                "eos": [module.tokenizer.eos_token_id], "sampling": {"n": 1, "temperature": 0.0, "top_p": 1.0,
                                                                   "seed": 0, "max_tokens": 8},
                "lora": {"path": str(adapter), "rank": 8, "id": update + 1, "name": f"p{update}"}})
            module.model.eval()
            with torch.no_grad():
                hf = module.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           max_new_tokens=8, do_sample=False,
                                           pad_token_id=module.tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
            module.model.train()
            eos = module.tokenizer.eos_token_id
            for got, want in zip(response["outputs"], hf.tolist()):
                want = want[: want.index(eos) + 1] if eos in want else want
                assert [t for t in got[0]["ids"] if t != eos] == [t for t in want if t != eos]
        rollout = sample_vllm(module, batch, module.rl_cfg)
        assert rollout["completion_mask"].sum() > 0 and rollout["input_ids"].shape[0] == 3 * 2
        module._trainer = None
        loss, stats = grpo_step(module, batch)
        assert torch.isfinite(loss) and stats["completion_length"] > 0
    finally:
        server.close()
        module._vllm_server = None
