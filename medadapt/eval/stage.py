"""The test stage of ``CausalLMModule``: the leaderboard benchmarks, scored or generated, gathered and written.

A mixin so that the module stays one class for every stage while its test hooks live beside the rest of the
evaluation: ``test_step`` hands each batch to ``harness.BenchmarkHarness``; the epoch's end gathers every rank's
records and writes results.json and predictions.jsonl into a results folder this run holds (locked, an earlier
run's results set aside first); the ``vllm`` backend generates from exactly the weights being evaluated.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from medadapt.fingerprint import adapter_digest
from medadapt.model import save_adapter
from medadapt.provenance import write_adapter_metadata


class TestStage:
    """Test hooks of ``CausalLMModule`` (it provides model, tokenizer, hparams, resolved_model_cfg, lora_used)."""

    __test__ = False  # a mixin named Test*, not a pytest test class

    # ---- test: leaderboard benchmarks -------------------------------------------------------------
    def on_test_start(self) -> None:
        """Hold the results folder for this run (rank 0 decides, every rank learns it before any work)."""
        from medadapt.eval.report import lock_results, set_aside_previous

        self._release_results_lock()  # one an earlier, failed test of this module still holds
        failure = None
        if self.trainer.is_global_zero:
            try:
                self._results_lock = lock_results(self.hparams.results_dir)
                set_aside_previous(self.hparams.results_dir)
            except Exception as e:  # busy, or a refused path: the lock is not kept past a refusal
                self._release_results_lock()
                failure = e
        error = self.trainer.strategy.broadcast(str(failure) if failure else None)  # every rank stops, none waits
        if failure is not None:
            raise failure
        if error:
            raise RuntimeError(error)

    def on_test_end(self) -> None:
        self._release_results_lock()

    def _release_results_lock(self) -> None:
        if getattr(self, "_results_lock", None) is not None:
            self._results_lock.release()
        self._results_lock = None

    def on_test_epoch_start(self) -> None:
        from medadapt.eval.harness import BenchmarkHarness

        self.harness = BenchmarkHarness()
        self._test_started = time.perf_counter()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.harness.step(self.model, self.tokenizer, batch)

    def on_test_epoch_end(self) -> None:
        if self.harness.deferred:
            self.harness.generate_deferred(self._serve_with_vllm)
        meta = {"model": asdict(self.resolved_model_cfg), "lora": asdict(self.lora_used) if self.lora_used else None,
                "adapter": self.init_adapter_path, "ckpt_path": self.trainer.ckpt_path,
                # by content, so a results folder names the weights it scored wherever the adapter moved (push checks it)
                "adapter_digest": adapter_digest(self.init_adapter_path) if self.init_adapter_path else None,
                "seconds": round(time.perf_counter() - self._test_started, 3),  # the test epoch, start-up excluded
                "vllm_python": getattr(self, "vllm_interpreter", None)}  # the interpreter that ran, if vLLM did
        summary = self.harness.finish(self.trainer.strategy, meta, self.hparams.results_dir)
        for task, m in summary["tasks"].items():
            metrics = {f"test/{task}/acc": m["acc"], f"test/{task}/acc_norm": m["acc_norm"]}
            if "unparsable" in m:  # generative mode: replies the reader could not read
                metrics[f"test/{task}/unparsable"] = float(m["unparsable"])
            self.log_dict(metrics, rank_zero_only=True)
        self.log("test/macro_avg_acc", summary["macro_avg_acc"], rank_zero_only=True)

    def _serve_with_vllm(self, rows: list, generation) -> list:
        """Generate ``rows`` with vLLM from the evaluated weights (one process: vLLM spreads over GPUs itself)."""
        import gc
        import tempfile

        from medadapt.eval import vllm_backend
        from medadapt.model_config import resolve_dtype

        if self.trainer.world_size > 1:
            raise RuntimeError("generation.backend: vllm runs on one process; use generation.tensor_parallel_size or "
                               "vllm_engine_args.data_parallel_size for several GPUs, not --trainer.devices")
        with tempfile.TemporaryDirectory() as tmp:
            adapter = self.init_adapter_path
            if adapter is None and self.lora_used is not None:  # a fit checkpoint: its LoRA as a PEFT adapter
                adapter = tmp
                save_adapter(self.model, adapter)
                write_adapter_metadata(adapter, self.resolved_model_cfg, self.lora_used)
            dtype = str(resolve_dtype(self.resolved_model_cfg.compute_dtype)).removeprefix("torch.")
            model_dir, lora = vllm_backend.served_weights(self.resolved_model_cfg, adapter, dtype)
            self.model = None  # free the HF copy (and its GPU memory) before vLLM takes the device
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.vllm_interpreter = vllm_backend.vllm_python(generation.vllm_python)  # recorded in results.json
            return vllm_backend.generate(self.tokenizer, rows, generation, model_dir, lora, dtype, self.vllm_interpreter)
