"""Who draws completions from the policy: HF ``generate`` in the training process, or one vLLM engine per rank.

The vLLM engine (``eval/vllm_worker.py --serve``) is started once and kept: it serves the base with the adapters
stacked under the policy merged into it (``served_weights``: one merge per content, written once under a file lock
whatever the number of ranks), and the policy's own LoRA is saved after every update and sent with a fresh
``LoRARequest`` id (vLLM caches adapters by id). Only the latest policy folder is kept on disk (a 500-step run would
otherwise leave 500 × 74 MB). Under DDP each rank's engine runs on that rank's GPU.
"""

from __future__ import annotations

import logging
import shutil
from typing import Optional

import torch

from medadapt.eval.generative import FORCED_ANSWER, GenRow
from medadapt.model import save_adapter
from medadapt.rl.grpo import GRPOConfig
from medadapt.rl.rollout import Completion, Sampling, completions_of, sample_hf, vllm_request

log = logging.getLogger(__name__)


class PolicySampler:
    """Completions of the current policy of ``module`` (a ``GRPOModule``) by its ``rl.backend``."""

    def __init__(self, module):
        self.module, self.server, self.sent = module, None, None

    @property
    def cfg(self) -> GRPOConfig:
        return self.module.rl_cfg

    def sample(self, rows: list[GenRow], n: int, sampling: Sampling, seed: Optional[int] = None) -> list[Completion]:
        """``n`` completions per row. HF draws from torch's RNG (seeded here when ``seed`` is given); vLLM from
        per-prompt seeds derived from ``seed`` (drawn from torch's RNG when null, so a resumed run draws the same)."""
        if self.cfg.backend == "hf":
            if seed is not None:
                torch.manual_seed(seed)
            return sample_hf(self.module.model, self.module.tokenizer, rows, n, sampling, self.module.device)
        if seed is None:
            seed = int(torch.randint(2**31 - 1, (1,)))
        server = self.start()
        tokenizer = self.module.tokenizer
        response = server.generate(vllm_request(tokenizer, rows, n, sampling, seed, self.current_lora()))
        return completions_of(response, rows, tokenizer, tokenizer.encode(FORCED_ANSWER, add_special_tokens=False))

    def current_lora(self) -> dict:
        """The policy's LoRA as it is now, saved under a new id (the previous folder removed once replaced)."""
        server, module = self.server, self.module
        number = server.requests + 1
        folder = server.dir / f"policy{number}"
        save_adapter(module.model, folder)
        if self.sent is not None:
            shutil.rmtree(self.sent, ignore_errors=True)
        self.sent = folder
        return {"path": str(folder), "rank": module.lora_used.r, "id": number, "name": f"policy{number}"}

    def start(self):
        """The rank's vLLM engine, started once."""
        if self.server is None:
            from medadapt.eval import vllm_backend
            from medadapt.model_config import resolve_dtype

            module, cfg = self.module, self.cfg
            dtype = str(resolve_dtype(module.resolved_model_cfg.compute_dtype)).removeprefix("torch.")
            model_dir, _ = vllm_backend.served_weights(module.resolved_model_cfg, None, dtype)
            engine = {"model": model_dir, "tokenizer": model_dir, "dtype": dtype, "sampling": {"seed": 0},
                      "lora": {"rank": module.lora_used.r}, "enforce_eager": cfg.enforce_eager,
                      "engine_args": cfg.vllm_engine_args, "max_model_len": module.rl_max_model_len,
                      "logprobs_mode": "processed_logprobs"}  # after temperature and filtering: what was sampled
            device = module.device.index if module.device.type == "cuda" else None
            self.server = vllm_backend.VLLMServer(vllm_backend.vllm_python(cfg.vllm_python), engine, device=device)
        return self.server

    def close(self) -> None:
        server, self.server, self.sent = self.server, None, None
        if server is not None:
            server.close()
