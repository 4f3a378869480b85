"""The re-probe's residue (issue 27): each SILENT, SECURITY and TRACEBACK finding reproduced, and what happens now.

Grouped by the pattern behind them: what a run does with non-finite numbers; what reuse decisions fingerprint; how
processes end; how files are written. Each test fails on the code the finding was made on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from medadapt.cli import main as cli

from .conftest import REPO, evaluate, sft_stage, tiny_trainer


# ---- non-finite numbers stop everything ---------------------------------------------------------------------------
def test_a_loss_that_turns_nan_stops_training_naming_the_step(tiny_qwen, short_sft_file, tmp_path):
    """SILENT 1: a run whose loss became NaN went on and exported a NaN adapter. Now the first logging step after it
    stops the run naming the step and the settings, and no adapter is exported."""
    import lightning as L

    from medadapt.training import NonFiniteTrainingError

    from .conftest import connect, tiny_data, tiny_module

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 1:
                with torch.no_grad():
                    next(p for n, p in module.named_parameters() if "lora_A" in n).fill_(float("nan"))

    L.seed_everything(0)
    module = tiny_module(tiny_qwen)
    module.hparams.adapter_dir = str(tmp_path / "adapter")
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite at optimizer step 2 .*optim.lr"):
        tiny_trainer(tmp_path, max_steps=4, log_every_n_steps=1, callbacks=[Poison()]).fit(
            module, connect(tiny_data(short_sft_file, batch_size=2, val_fraction=0.0), module))
    assert not (tmp_path / "adapter").exists()


def test_no_adapter_with_nan_weights_is_exported_and_an_unmoved_one_says_so(tiny_qwen, caplog):
    from .conftest import tiny_module

    module = tiny_module(tiny_qwen)
    module.build_model(training=True)
    with caplog.at_level("WARNING"):
        module.check_trained_tensors()
    assert "never left its initialization" in caplog.text  # SILENT 2: no update at all, now said
    with torch.no_grad():
        next(p for n, p in module.model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="refusing to export the adapter: 1 of .* NaN/inf"):
        module.check_trained_tensors()


def test_non_finite_log_likelihoods_fail_the_test_stage_naming_the_items(monkeypatch):
    """SILENT 1: a NaN adapter was scored: every log-likelihood null, pred 0, an accuracy reported."""
    import medadapt.eval.scoring as scoring
    from medadapt.eval.harness import BenchmarkHarness, NonFiniteScoreError
    from medadapt.eval.scoring import Row
    from medadapt.eval.tasks import Item

    items = [Item("medqa_4options", str(i), "Q?", ["A", "B"], 0, "Q?", ["x", "y"]) for i in range(2)]
    rows = [Row(it, [1, 2, 3], [(0, [4]), (1, [5])]) for it in items]
    monkeypatch.setattr(scoring, "forward_rows", lambda model, batch: torch.full((2, 1, 8), float("nan")))
    with pytest.raises(NonFiniteScoreError, match=r"2 item\(s\) \(medqa_4options/0, medqa_4options/1\)"):
        BenchmarkHarness().step(None, None, {"mode": "loglikelihood", "rows": rows, "settings": {}})


# ---- reuse decisions fingerprint everything they depend on --------------------------------------------------------
def test_rl_question_files_are_in_the_stage_fingerprint(tmp_path):
    """SILENT 5: an RL stage's question file rewritten → "rl: skipped" (only data.init_args.data_files was hashed)."""
    from medadapt.commands.multistep import Stage, stage_fingerprint

    questions, pqal = tmp_path / "q.jsonl", tmp_path / "pqal.json"
    questions.write_text('{"question": "q", "options": ["a", "b"], "answer": "A"}\n')
    pqal.write_text("{}")
    cfg = {"model": {"class_path": "medadapt.rl.module.GRPOModule", "init_args": {"model": {"name_or_path": "m"}}},
           "data": {"init_args": {"sources": [{"name": "q", "data_files": str(questions)}],
                                  "pubmedqa": {"data_file": str(pqal)}}}}
    before = stage_fingerprint(Stage("rl", "rl.yaml"), cfg)
    assert set(before["data_files"]) == {str(questions), str(pqal)}
    questions.write_text('{"question": "q", "options": ["a", "b"], "answer": "B"}\n')
    assert stage_fingerprint(Stage("rl", "rl.yaml"), cfg)["data_files"] != before["data_files"]


def test_study_evaluations_are_redone_when_the_eval_config_or_the_index_changes(tmp_path):
    """SILENT 6 and 7: an edited eval YAML (tasks, limit) and a re-built index were "reused"."""
    from medadapt.commands.study import scored_fingerprint
    from medadapt.rag.config import IndexConfig, RetrievalConfig
    from medadapt.rag.context import RagArmConfig

    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text("data:\n  init_args:\n    limit: 30\n")
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text('{"chunks": ["000000.parquet"]}')
    rag = RagArmConfig(index=IndexConfig(dir=str(index)), retrieval=RetrievalConfig())
    first = scored_fingerprint(None, None, str(eval_cfg), rag)
    eval_cfg.write_text("data:\n  init_args:\n    limit: 40\n")
    second = scored_fingerprint(None, None, str(eval_cfg), rag)
    (index / "manifest.json").write_text('{"chunks": ["000000.parquet", "000001.parquet"]}')
    third = scored_fingerprint(None, None, str(eval_cfg), rag)
    assert first["eval_config"] != second["eval_config"] and second["index"] != third["index"]


def test_an_index_refuses_an_embedder_whose_weights_changed_under_its_name(tmp_path):
    """SILENT 15: embedder weights replaced in place: `ask` retrieved other sources with no word."""
    from medadapt.rag.local_index import LocalIndex

    index = LocalIndex(str(tmp_path / "index"))
    index.check_embedder("my-embedder", "sha256:aaaa")
    index._save_manifest({"chunks": [], "built": None, "embedder": "my-embedder", "embedder_identity": "sha256:aaaa"})
    index.check_embedder("my-embedder", "sha256:aaaa")  # the same weights: fine
    with pytest.raises(ValueError, match="its weights are now other ones"):
        index.check_embedder("my-embedder", "sha256:bbbb")


def test_a_file_swapped_for_same_size_bytes_with_its_mtime_restored_gets_a_new_digest(tmp_path):
    """SILENT 17: the digest cache was keyed by path, size and mtime; the change time, which no user can set back,
    now keys it too (only files of 64 MB and more are cached)."""
    from medadapt.fingerprint import file_digest

    big = tmp_path / "weights.bin"
    big.write_bytes(b"a" * (64 << 20))
    stat = big.stat()
    first = file_digest(big)
    time.sleep(0.01)
    big.write_bytes(b"b" * (64 << 20))
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert big.stat().st_mtime_ns == stat.st_mtime_ns and big.stat().st_size == stat.st_size
    assert file_digest(big) != first


def test_a_copied_stacked_adapter_without_its_record_is_refused_as_a_base_adapter(tiny_qwen, tmp_path, monkeypatch):
    """SILENT 4: a copied SFT adapter whose medadapt_adapter.json was deleted was stacked alone, dropping the CPT
    adapter it was trained on. And a packaged name and its converted folder are one model."""
    from medadapt.model import load_model
    from medadapt.model_config import LoraConfig, ModelConfig
    from medadapt.provenance import AdapterMismatchError, same_model
    from medadapt.weights import write_scaled_adapter

    base = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[])
    write_scaled_adapter(base, tmp_path / "sft", rho=0.05)
    (tmp_path / "sft" / "medadapt_adapter.json").unlink()
    with pytest.raises(AdapterMismatchError, match="has no medadapt_adapter.json"):
        load_model(ModelConfig(**{**base.__dict__, "base_adapters": [str(tmp_path / "sft")]}),
                   LoraConfig(r=4, alpha=8, dropout=0.0), training=True)
    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    converted.mkdir(parents=True)
    assert same_model("smollm2-135m-instruct", str(converted)) and not same_model("smollm2-135m-instruct", tiny_qwen)


def test_resuming_a_copied_run_folder_updates_its_last_checkpoint(trained, short_sft_file, tmp_path):
    """SILENT 16: resuming a copied run folder wrote last-v1.ckpt and left last.ckpt stale."""
    copy = tmp_path / "copy"
    shutil.copytree(trained["ckpt"].parent, copy)
    cli(["fit", "--model.model.name_or_path", trained["base"], "--model.model.compute_dtype", "float32",
         "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}), "--model.optim.fused", "false",
         "--model.adapter_dir", str(tmp_path / "adapter"), "--data", "medadapt.data.reasoning.ReasoningSFTDataModule",
         "--data.data_files", short_sft_file, "--data.max_length", "256", "--data.val_fraction", "0",
         "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                             "init_args": {"dirpath": str(copy), "save_last": True}}]),
         "--ckpt_path", str(copy / "last.ckpt")])
    assert not list(copy.glob("last-v*.ckpt"))
    assert torch.load(copy / "last.ckpt", weights_only=True)["global_step"] == 3


# ---- processes end, and say how -------------------------------------------------------------------------------------
@pytest.mark.slow  # out of the 5-minute fast set; CI runs it
def test_a_sigterm_stops_fit_with_exit_143_and_no_adapter(trained, short_sft_file, tmp_path):
    """SILENT 9: `kill -TERM <fit>` gave "Received SIGTERM" and exit 0: a script's `&&` took it for success."""
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "medadapt", "fit", "--model.model.name_or_path", trained["base"],
            "--model.model.compute_dtype", "float32", "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
            "--model.optim.fused", "false", "--model.adapter_dir", str(tmp_path / "adapter"),
            "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", short_sft_file,
            "--data.max_length", "256", "--data.val_fraction", "0", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "100000", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                "init_args": {"dirpath": str(ckpt), "every_n_train_steps": 1,
                                                              "save_top_k": -1}}])]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not list(ckpt.glob("*.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(ckpt.glob("*.ckpt")), "training never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and not (tmp_path / "adapter").exists()


def test_a_stage_stopped_by_a_signal_is_named_as_such(monkeypatch, tmp_path):
    """TRACEBACK 2: SIGTERM to a multistep stage's fit: the runner went on and crashed on "no PEFT adapter"."""
    from medadapt.commands import multistep

    class Stopped:
        pid = 0

        def __init__(self, *a, **kw):
            pass

        def wait(self):
            return 143

    monkeypatch.setattr(multistep.subprocess, "Popen", Stopped)
    with pytest.raises(multistep.StageTerminatedError, match=r"stopped by SIGTERM \(exit 143\).*run the same command"):
        multistep.launch(["fit", "--config", "x.yaml"])


def test_the_runner_s_death_takes_its_stage_with_it_and_sighup_stops_it(tmp_path):
    """SILENT 8: `kill -9` or `kill -HUP` of the multistep runner left its fit running as an orphan (PPID 1), the
    work_dir's lock released, so a re-run started a second fit in the same folder."""
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from medadapt.commands.multistep import die_with_parent, terminate_on_sigterm\n"
        "terminate_on_sigterm()\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True, "
        "preexec_fn=die_with_parent)\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pidfile.read_text())
    parent.kill()  # SIGKILL: no handler runs in the runner
    parent.wait(timeout=30)
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z" \
            and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
    hup = subprocess.Popen([sys.executable, "-c", "from medadapt.commands.multistep import terminate_on_sigterm; "
                            "import time; terminate_on_sigterm(); print('ready', flush=True); time.sleep(60)"],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert hup.stdout.readline().strip() == "ready"
    hup.send_signal(signal.SIGHUP)
    assert hup.wait(timeout=30) == 128 + signal.SIGHUP


# ---- one write path: no link followed, modes from the umask, nothing cleared before its inputs are read ------------
def test_files_get_the_mode_a_plain_file_gets(tmp_path):
    """SILENT 12: results.json, predictions.jsonl, DONE.json … were 0600 under umask 0022."""
    from medadapt.files import write_atomic

    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_export_refuses_empty_home_root_and_working_directory_outputs(tiny_qwen, tmp_path, monkeypatch):
    """SILENT 10: `export --out "$UNSET" --overwrite true` cleared the working directory."""
    from medadapt.commands.export import main as export_main
    from medadapt.files import UnsafePathError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    for out in ("", ".", str(tmp_path), os.path.expanduser("~"), "/"):
        with pytest.raises(UnsafePathError):
            export_main(["--base", tiny_qwen, "--out", out, "--overwrite", "true"])
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_overwrite_replaces_an_export_only_once_the_new_one_is_whole(tiny_qwen, tmp_path):
    """SILENT 11: --overwrite cleared a good export, then an unreadable adapter failed the export: the folder was left
    empty. Now the old export stays until the new one is written."""
    from medadapt.commands.export import main as export_main
    from medadapt.files import UnreadableFileError
    from medadapt.model_config import ModelConfig
    from medadapt.weights import write_scaled_adapter

    out = tmp_path / "exported"
    export_main(["--base", tiny_qwen, "--out", str(out), "--dtype", "float32"])
    before = sorted(p.name for p in out.iterdir())
    adapter = tmp_path / "adapter"
    write_scaled_adapter(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32",
                                     base_adapters=[]), adapter, rho=0.05)
    (adapter / "adapter_model.safetensors").write_bytes(b"cut")
    with pytest.raises(UnreadableFileError):
        export_main(["--base", tiny_qwen, "--adapter", str(adapter), "--out", str(out), "--overwrite", "true"])
    assert sorted(p.name for p in out.iterdir()) == before and not list(tmp_path.glob(".exported.*"))


def test_a_planted_link_for_earlier_results_or_the_config_is_never_written_through(trained, tmp_path):
    """SECURITY 1 and 2: `R/previous -> victimdir` got the old results moved into the victim; `R/config.yaml ->
    victim` was overwritten with the run's YAML."""
    from medadapt.files import UnsafePathError

    victim_dir, victim = tmp_path / "victimdir", tmp_path / "victim.txt"
    victim_dir.mkdir()
    (victim_dir / "results.json").write_text("precious")
    victim.write_text("precious")
    out = tmp_path / "R"
    evaluate(trained, out)
    (out / "config.yaml").unlink(missing_ok=True)
    (out / "config.yaml").symlink_to(victim)
    (out / "previous").symlink_to(victim_dir)
    with pytest.raises(UnsafePathError, match="symbolic link") as refused:  # its traceback keeps the module alive
        evaluate(trained, out)
    assert (victim_dir / "results.json").read_text() == "precious"
    assert refused.traceback  # held to here: a refused run must not keep the results folder locked
    (out / "previous").unlink()
    evaluate(trained, out)  # config.yaml: the link is replaced by the run's file, the victim untouched
    assert victim.read_text() == "precious" and not (out / "config.yaml").is_symlink()


def test_a_half_written_merge_is_discarded_and_redone(tmp_path):
    """TRACEBACK 4: `kill -9` during the vLLM merge left `<fp>.partial` and every re-run failed on it."""
    from medadapt.eval.vllm_backend import merge_once

    folder = tmp_path / "vllm" / "abc123"
    folder.mkdir(parents=True)
    (folder / "model-00001.safetensors").write_bytes(b"half")  # a killed merge: no medadapt_export.json
    (tmp_path / "vllm" / "abc123.partial").mkdir()

    def write(out):
        (out / "model.safetensors").write_bytes(b"whole")
        (out / "medadapt_export.json").write_text("{}")

    merge_once(folder, write, "test")
    assert sorted(p.name for p in folder.iterdir()) == ["medadapt_export.json", "model.safetensors"]


# ---- compare shows only numbers it can recompute -----------------------------------------------------------------
def write_run(folder, records, **edits):
    from medadapt.eval.report import summarize, write_results

    write_results(str(folder), summarize(records), records, {"data": {"mode": "loglikelihood"}})
    if edits:
        results = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps({**results, **edits}))


def test_compare_recomputes_what_it_shows_and_takes_a_one_item_run(tmp_path):
    """SILENT 13: compare printed a hand-edited macro_avg_acc; TRACEBACK 3: a 1-item run crashed it (CI [null,
    null])."""
    from medadapt.eval.compare import IncomparableRunsError
    from medadapt.eval.compare import main as compare

    rec = lambda i, pred: {"task": "t", "id": str(i), "gold": 0, "pred": pred, "pred_norm": pred,  # noqa: E731
                           "acc": float(pred == 0), "loglikelihoods": [-1.0, -2.0]}
    write_run(tmp_path / "a", [rec(0, 0)])
    write_run(tmp_path / "b", [rec(0, 1)])
    compare([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "one")])
    assert "| a | 100.0 |" in (tmp_path / "one.md").read_text()
    write_run(tmp_path / "c", [rec(0, 0), rec(1, 1)], macro_avg_acc=0.99)
    with pytest.raises(IncomparableRunsError, match="macro_avg_acc 0.99.*edited"):
        compare([str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "two")])


# ---- one validation place: nothing longer than the model reads -----------------------------------------------------
def test_a_prompt_longer_than_the_model_s_context_is_never_scored_whole(tmp_path, r1_tokenizer, caplog):
    """SILENT 14: a 25k-token prompt against an 8,192-token context, max_length 30000: scored, no word."""
    from medadapt.eval.data import BenchmarkDataModule

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "1", "question": "word " * 3000, "options": ["a", "b"], "answer": "A"}) + "\n")
    data = BenchmarkDataModule(tasks=[], custom_tasks=[{"name": "long", "data_files": str(long),
                                                        "answer_format": "letter"}], max_length=30000)
    data.connect(r1_tokenizer)
    with caplog.at_level("WARNING"):
        data.limit_context(512)
        data.setup("test")
    assert "exceeds the model's context (512 tokens)" in caplog.text and data.truncated == {"long": 1}
    assert max(len(r.input_ids) for rows in data.encoded for r in rows) <= 512


@pytest.mark.slow
def test_a_stage_stopped_after_its_last_step_is_finished_by_the_next_run(trained, short_sft_file, tmp_path):
    """TRACEBACK 1: a stage stopped after its final step (its last checkpoint written, no adapter, no DONE) failed
    every re-run with "nothing is left to train … (--overwrite true)", a flag multistep does not have. The next run
    now resumes it, trains nothing, exports the adapter and marks it done."""
    from medadapt.commands.multistep import Stage, run

    stage_cfg = tmp_path / "stage.yaml"
    stage_cfg.write_text(json.dumps(sft_stage(trained["base"], short_sft_file, 2)))
    stages = [Stage("s", str(stage_cfg))]
    run(stages, str(tmp_path / "w"))
    stage = tmp_path / "w" / "s"
    done = json.loads((stage / "DONE.json").read_text())
    import safetensors.torch as st

    original = st.load_file(stage / "adapter" / "adapter_model.safetensors")
    (stage / "DONE.json").unlink()  # as if stopped right after the last checkpoint
    shutil.rmtree(stage / "adapter")
    (stage / "STARTED.json").write_text(json.dumps({"stage": "s", "fingerprint": done["fingerprint"]}))
    assert [s["outcome"] for s in run(stages, str(tmp_path / "w"))] == ["resumed"]
    assert (stage / "DONE.json").exists() and (stage / "adapter" / "adapter_model.safetensors").exists()
    finished = st.load_file(stage / "adapter" / "adapter_model.safetensors")
    assert finished.keys() == original.keys() and all(torch.equal(finished[k], original[k]) for k in finished), \
        max(float((finished[k] - original[k]).abs().max()) for k in finished)  # not retrained
    assert json.loads((stage / "DONE.json").read_text())["adapter_digest"] == done["adapter_digest"]  # by content
