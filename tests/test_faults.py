"""What medadapt promises when input is bad or a run goes wrong: nothing lost, nothing silent.

One test per promise, in the order of the README's "What medadapt promises". Each either gets a clear error
naming the file, record or setting at fault, or does the right thing and says so.
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from medadapt.cli import main as cli

from .conftest import DATA, build_tiny_model, evaluate

BENCH = DATA / "benchmarks"


# ---- checkpoints and adapters -------------------------------------------------------------------------
def test_explicit_settings_win_over_the_checkpoint(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkpoint's own results_dir is the default "results/run"
    evaluate(trained, tmp_path / "mine", "--ckpt_path", str(trained["ckpt"]))
    assert (tmp_path / "mine" / "results.json").exists() and not (tmp_path / "results").exists()


def test_resuming_fit_exports_where_the_command_line_says(trained, short_sft_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"].parent, ckpt)
    cli(["fit", "--model.model.name_or_path", trained["base"], "--model.model.compute_dtype", "float32",
         "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}), "--model.optim.fused", "false",
         "--model.adapter_dir", str(tmp_path / "new-adapter"),
         "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", short_sft_file,
         "--data.max_length", "256", "--data.val_fraction", "0", "--data.batch_size", "2",
         "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                             "init_args": {"dirpath": str(ckpt), "save_last": True}}]),
         "--ckpt_path", str(ckpt / "last.ckpt")])
    assert (tmp_path / "new-adapter" / "adapter_model.safetensors").exists()
    assert (trained["adapter"] / "adapter_model.safetensors").stat().st_mtime < \
        (tmp_path / "new-adapter" / "adapter_model.safetensors").stat().st_mtime


def test_a_checkpoint_with_another_lora_shape_or_base_is_an_error(trained, tiny_llama, tmp_path):
    from medadapt.model import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match=r"different LoRA: r=4 \(config: 8\)"):
        evaluate(trained, tmp_path / "a", "--ckpt_path", str(trained["ckpt"]),
                 "--model.lora", json.dumps({"r": 8, "alpha": 16}))
    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        evaluate({**trained, "base": tiny_llama}, tmp_path / "b", "--ckpt_path", str(trained["ckpt"]))


def test_checkpoint_urls_are_refused_before_anything_is_fetched(trained, tmp_path):
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/evil.ckpt"
        with pytest.raises(ValueError, match="is a URL"):
            evaluate(trained, tmp_path / "r", "--ckpt_path", url)
    finally:
        server.shutdown()
    assert requests == []
    with pytest.raises(ValueError, match="weights_only: false"):
        evaluate(trained, tmp_path / "w", "--ckpt_path", str(trained["ckpt"]), "--weights_only", "false")


def test_an_adapter_made_for_another_base_is_an_error(trained, tmp_path, tiny_llama):
    from medadapt.model import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        evaluate({**trained, "base": tiny_llama}, tmp_path / "a", "--model.init_adapter", str(trained["adapter"]))
    # a plain PEFT adapter (no medadapt metadata): PEFT's own base_model_name_or_path is checked
    plain = tmp_path / "plain"
    shutil.copytree(trained["adapter"], plain)
    (plain / "medadapt_adapter.json").unlink()
    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        evaluate({**trained, "base": tiny_llama}, tmp_path / "b", "--model.init_adapter", str(plain))
    # an adapter that names this base but has layers it lacks: every tensor must find its layer (peft warns)
    from medadapt.model import LoraConfig, ModelConfig, load_model

    deeper = ModelConfig(name_or_path=str(build_tiny_model(tmp_path / "deeper", layers=3)), compute_dtype="float32")
    load_model(deeper, LoraConfig(r=4, alpha=8), training=False).save_pretrained(tmp_path / "deep-adapter")
    cfg = json.loads((tmp_path / "deep-adapter" / "adapter_config.json").read_text())
    (tmp_path / "deep-adapter" / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": trained["base"]}))
    with pytest.raises(AdapterMismatchError, match="14 tensor.s. without a layer"):
        evaluate(trained, tmp_path / "c", "--model.init_adapter", str(tmp_path / "deep-adapter"))


def test_fit_refuses_a_checkpoint_folder_holding_another_run(trained, short_sft_file, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"].parent, ckpt)
    args = ["fit", "--model.model.name_or_path", trained["base"], "--model.model.compute_dtype", "float32",
            "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}), "--model.optim.fused", "false",
            "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", short_sft_file,
            "--data.max_length", "256", "--data.val_fraction", "0", "--data.batch_size", "2",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                "init_args": {"dirpath": str(ckpt), "save_last": True}}])]
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run"):
        cli(args)
    cli([*args, "--overwrite", "true"])
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "last.ckpt"]  # no last-v1.ckpt


# ---- results -----------------------------------------------------------------------------------------
def test_a_results_folder_another_run_is_writing_is_refused(trained, tmp_path):
    from filelock import FileLock

    (tmp_path / "busy").mkdir()
    with FileLock(str(tmp_path / "busy" / ".lock")):
        with pytest.raises(RuntimeError, match="being written by another run"):
            evaluate(trained, tmp_path / "busy")
    first = evaluate(trained, tmp_path / "busy")  # free again: runs, and leaves no partial files
    assert first["n"] == 2 and not list((tmp_path / "busy").glob("*.tmp"))


def test_a_truncated_benchmark_is_an_error_unless_partial_is_allowed(trained, tmp_path):
    from medadapt.eval.tasks import IncompleteBenchmarkError

    local = tmp_path / "bench"
    shutil.copytree(BENCH, local)
    lines = (local / "pubmedqa_test_ground_truth.json").read_text()
    truth = dict(list(json.loads(lines).items())[:400])  # 400 of the 500 test questions
    (local / "pubmedqa_test_ground_truth.json").write_text(json.dumps(truth))
    with pytest.raises(IncompleteBenchmarkError, match="pubmedqa has 400 items, the leaderboard's test set has 500"):
        evaluate(trained, tmp_path / "r", "--data.local_dir", str(local))
    results = evaluate(trained, tmp_path / "r", "--data.local_dir", str(local), "--data.allow_partial", "true")
    assert results["items_available"] == {"pubmedqa": 400} and results["n"] == 2


def test_compare_refuses_duplicate_names_and_pairs_only_shared_items(tmp_path):
    from medadapt.eval.compare import main as compare
    from medadapt.eval.report import summarize, write_results

    def run(directory, ids, fp):
        records = [{"task": "pubmedqa", "id": str(i), "gold": 0, "pred": 0, "pred_norm": 0, "acc": 1.0,
                    "acc_norm": 1.0, "loglikelihoods": [0.0, -1.0]} for i in ids]
        write_results(str(directory), summarize(records), records, {"data_fingerprint": fp})

    run(tmp_path / "a" / "run", range(10), "aaaa")
    run(tmp_path / "b" / "run", range(5, 20), "bbbb")
    with pytest.raises(SystemExit, match="two runs are named 'run'"):
        compare([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(tmp_path / "c")])
    compare([f"a={tmp_path / 'a' / 'run'}", f"b={tmp_path / 'b' / 'run'}", "--out", str(tmp_path / "x" / "run1.5")])
    table = (tmp_path / "x" / "run1.5.md").read_text()
    assert table.startswith("**WARNING: these runs did not score the same items**")
    assert "| b | pubmedqa | 5 | 0 | 0 | 1 |" in table  # paired on the 5 shared items, and says so


# ---- indexes -----------------------------------------------------------------------------------------
def small_corpus(tmp_path, n=12, edit=None):
    rows = [json.loads(line) for line in open(DATA / "corpus" / "medquad.jsonl")][:n]
    if edit:
        edit(rows)
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    from medadapt.rag.corpus import CorpusConfig

    return CorpusConfig(data_files=str(path), id_field="id", text_fields=["answer"], title_field=None)


def test_two_index_runs_on_one_folder_store_every_document_once(tmp_path):
    from medadapt.rag.local_index import LocalIndex, SearchIndex
    from medadapt.rag.config import IndexConfig
    from medadapt.rag.pipelines import build_index

    corpus, cfg = small_corpus(tmp_path), IndexConfig(dir=str(tmp_path / "idx"), chunk_size=4, batch_size=4)
    results = []
    runs = [threading.Thread(target=lambda: results.append(build_index(corpus, cfg))) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sorted(r["embedded"] for r in results) == [0, 12]  # the second run waited, then found them indexed
    ids = SearchIndex(cfg.dir).docs.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    # even a store with a doubled chunk (an old run's) builds search files that hold each id once
    index = LocalIndex(cfg.dir)
    manifest = index.manifest()
    shutil.copy(tmp_path / "idx" / "chunks" / manifest["chunks"][0], tmp_path / "idx" / "chunks" / "000099.parquet")
    index._save_manifest({**manifest, "chunks": manifest["chunks"] + ["000099.parquet"]})
    assert index.build() is True
    ids = SearchIndex(cfg.dir).docs.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12


def test_a_changed_document_is_re_embedded_and_a_corrupt_index_is_reported(tmp_path):
    from medadapt.rag.local_index import IndexCorruptError, SearchIndex
    from medadapt.rag.config import IndexConfig
    from medadapt.rag.pipelines import build_index

    cfg = IndexConfig(dir=str(tmp_path / "idx"), chunk_size=8, batch_size=4)
    build_index(small_corpus(tmp_path), cfg)

    def edit(rows):
        rows[3]["answer"] = "Completely rewritten: zebra dermatology notes."

    stats = build_index(small_corpus(tmp_path, edit=edit), cfg)
    assert stats["embedded"] == stats["changed"] == 1
    docs = SearchIndex(cfg.dir).docs
    assert docs.num_rows == 12 and "zebra dermatology" in " ".join(docs.column("content").to_pylist())

    dense = tmp_path / "idx" / "dense.faiss"
    dense.write_bytes(dense.read_bytes()[:100])  # truncated
    with pytest.raises(IndexCorruptError, match=r"index .*idx is corrupt: dense.faiss is 100 bytes"):
        SearchIndex(cfg.dir)
    assert build_index(small_corpus(tmp_path, edit=edit), cfg)["rebuilt"] is True  # index mends search files
    SearchIndex(cfg.dir)
    chunk = next((tmp_path / "idx" / "chunks").glob("*.parquet"))
    chunk.write_bytes(chunk.read_bytes()[:50])
    with pytest.raises(IndexCorruptError, match=f"chunk {chunk.name} cannot be read.*--rebuild"):
        build_index(small_corpus(tmp_path, edit=edit), cfg)
    assert build_index(small_corpus(tmp_path, edit=edit), cfg, rebuild=True)["embedded"] == 12


def test_an_empty_corpus_says_so_and_leaves_no_manifest(tmp_path):
    from medadapt.data.sources import DataSourceError
    from medadapt.rag.corpus import CorpusConfig
    from medadapt.rag.config import IndexConfig
    from medadapt.rag.pipelines import build_index

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataSourceError, match="empty.jsonl is empty"):
        build_index(CorpusConfig(data_files=str(tmp_path / "empty.jsonl"), text_fields=["answer"]),
                    IndexConfig(dir=str(tmp_path / "idx")))
    assert not (tmp_path / "idx" / "manifest.json").exists()


# ---- outputs stay where configured ------------------------------------------------------------------
def test_runs_without_a_logger_write_their_config_beside_their_outputs(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate(trained, tmp_path / "out")
    assert (tmp_path / "out" / "config.yaml").exists() and not (tmp_path / "config.yaml").exists()


# ---- bad input: clear errors -------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"Question": "a", "Complex_CoT": "b", "Response": "c"}\n{"Question": "a" "x": 1}\n',
     r"bad.jsonl: line 2: invalid JSON"),
    ("cut.json", b'[{"Question": "a"},\n {"Question": ', r"cut.json: line 2, column 15: invalid JSON"),
    ("latin.jsonl", '{"Question": "café"}\n'.encode("latin-1"), r"latin.jsonl: not UTF-8 text: byte 17 \(line 1\)"),
    ("none.json", b"[]", r"none.json holds no rows"),
    ("blank.jsonl", b"\n\n", r"blank.jsonl is empty"),
])
def test_unreadable_sft_files_name_the_file_and_the_place(tmp_path, name, content, message):
    from medadapt.data.reasoning import ReasoningSFTDataModule
    from medadapt.data.sources import DataSourceError, MalformedFileError

    from .conftest import R1_TOKENIZER

    (tmp_path / name).write_bytes(content)
    with pytest.raises((MalformedFileError, DataSourceError), match=message):
        ReasoningSFTDataModule(data_files=str(tmp_path / name), tokenizer=str(R1_TOKENIZER)).build_examples("fit")


def test_model_names_that_cannot_load_say_why(tmp_path, monkeypatch):
    from medadapt.model import ModelConfig, ModelNotFoundError, load_tokenizer

    with pytest.raises(ModelNotFoundError, match="model folder /nonexistent/models/r1 does not exist"):
        load_tokenizer(ModelConfig(name_or_path="/nonexistent/models/r1"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="the hub is unreachable.*--local-dir"):
        load_tokenizer(ModelConfig(name_or_path="someone/not-cached-model"))


def test_an_invalid_setting_is_reported_before_anything_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["fit", "--model.model.compute_dtype", "fp33", "--data", "medadapt.data.reasoning.ReasoningSFTDataModule",
             "--data.data_files", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert "compute_dtype" in err and "fp33" in err and "missing.jsonl" not in err
