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
import torch

from medadapt.cli import main as cli

from .conftest import DATA, build_tiny_model, evaluate, sft_stage

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
    from medadapt.provenance import AdapterMismatchError

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
    from medadapt.provenance import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        evaluate({**trained, "base": tiny_llama}, tmp_path / "a", "--model.init_adapter", str(trained["adapter"]))
    # a plain PEFT adapter (no medadapt metadata): PEFT's own base_model_name_or_path is checked
    plain = tmp_path / "plain"
    shutil.copytree(trained["adapter"], plain)
    (plain / "medadapt_adapter.json").unlink()
    with pytest.raises(AdapterMismatchError, match="was trained on base model"):
        evaluate({**trained, "base": tiny_llama}, tmp_path / "b", "--model.init_adapter", str(plain))
    # an adapter that names this base but has layers it lacks: every tensor must find its layer (peft warns)
    from medadapt.model import load_model
    from medadapt.model_config import LoraConfig, ModelConfig

    deeper = ModelConfig(name_or_path=str(build_tiny_model(tmp_path / "deeper", layers=3)), compute_dtype="float32")
    load_model(deeper, LoraConfig(r=4, alpha=8), training=False).save_pretrained(tmp_path / "deep-adapter")
    cfg = json.loads((tmp_path / "deep-adapter" / "adapter_config.json").read_text())
    (tmp_path / "deep-adapter" / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": trained["base"]}))
    with pytest.raises(AdapterMismatchError, match="14 tensor.s. without a layer"):
        evaluate(trained, tmp_path / "c", "--model.init_adapter", str(tmp_path / "deep-adapter"),
                 "--model.model.load_in_4bit", "false", "--model.model.base_adapters", "[]")


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
    from medadapt.model_config import ModelConfig, ModelNotFoundError, load_tokenizer

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


# ---- issue 21: reuse by content, locks and process hygiene, writes, validated inputs ----------------------------
def fake_fit(seed_box: list):
    """A stand-in for ``python -m medadapt fit`` in multistep: writes the stage's adapter (new weights each call)."""
    from medadapt.commands import multistep

    def launch(args, log_file=None):
        import yaml as _yaml

        from medadapt.model_config import ModelConfig
        from medadapt.weights import write_scaled_adapter

        cfg = _yaml.safe_load(open(args[args.index("--config") + 1]))
        model = cfg["model"]["model"]
        seed_box[0] += 1
        write_scaled_adapter(ModelConfig(name_or_path=model["name_or_path"], load_in_4bit=False,
                                         compute_dtype="float32", base_adapters=model.get("base_adapters") or []),
                             f"{cfg['run_dir']}/adapter", rho=0.01, seed=seed_box[0])
    return launch, multistep


def chain_config(tmp_path, base) -> str:
    path = tmp_path / "stage.yaml"
    path.write_text(json.dumps({"model": {"model": {"name_or_path": base}}, "trainer": {"logger": False}}))
    return str(path)


def test_multistep_reuses_a_stage_only_when_its_content_is_unchanged(tiny_qwen, tmp_path, monkeypatch):
    seeds = [0]
    launch, multistep = fake_fit(seeds)
    monkeypatch.setattr(multistep, "launch", launch)
    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    cfg = chain_config(tmp_path, tiny_qwen)
    chain = [multistep.Stage("cpt", cfg), multistep.Stage("sft", cfg, from_previous=True)]
    work = str(tmp_path / "w")
    assert [s["outcome"] for s in multistep.run(chain, work)] == ["trained", "trained"]
    assert [s["outcome"] for s in multistep.run(chain, work)] == ["skipped", "skipped"]
    changed = [multistep.Stage("cpt", cfg, ["--trainer.max_steps", "9"]), chain[1]]
    with pytest.raises(multistep.StageChangedError, match="stage cpt .*args changed"):
        multistep.run(changed, work)  # new arguments are never ignored by a DONE left in place
    # retrained CPT: SFT's base adapter changed by content, so SFT is retrained too (it was stacked on the old one)
    assert [s["outcome"] for s in multistep.run(changed, work, on_change="retrain")] == ["retrained", "retrained"]
    shutil.rmtree(tmp_path / "w" / "cpt" / "adapter")
    with pytest.raises(multistep.StageChangedError, match=r"adapter \(deleted\)"):
        multistep.run(changed, work)
    with pytest.raises(ValueError, match="unique"):
        multistep.run([multistep.Stage("a", cfg), multistep.Stage("a", cfg)], str(tmp_path / "w2"))
    held = multistep.lock_work_dir(tmp_path / "w3")
    try:
        with pytest.raises(RuntimeError, match="in use by another run"):
            multistep.run([multistep.Stage("a", cfg)], str(tmp_path / "w3"))
    finally:
        held.release()


def test_an_adapter_is_refused_when_what_it_was_trained_on_changed(tiny_qwen, tmp_path, monkeypatch):
    """Base adapters by digest, the base by content, a stacked adapter never without its record."""
    from medadapt.model_config import ModelConfig
    from medadapt.provenance import AdapterMismatchError
    from medadapt.weights import write_scaled_adapter

    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    plain = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32", base_adapters=[])
    write_scaled_adapter(plain, tmp_path / "cpt", rho=0.01, seed=1)
    stacked = ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32",
                          base_adapters=[str(tmp_path / "cpt")])
    write_scaled_adapter(stacked, tmp_path / "sft", rho=0.01, seed=2)
    evaluated = ModelConfig(name_or_path=tiny_qwen, compute_dtype="float32")
    from medadapt.module import CausalLMModule

    def build(adapter, cfg=evaluated):
        CausalLMModule(model=cfg, lora=None, init_adapter=str(adapter)).build_model(training=False)

    build(tmp_path / "sft")  # as trained: fine
    shutil.copytree(tmp_path / "cpt", tmp_path / "cpt-as-trained")
    write_scaled_adapter(plain, tmp_path / "cpt", rho=0.02, seed=3)  # CPT retrained under the same name
    with pytest.raises(AdapterMismatchError, match="now holds other weights"):
        build(tmp_path / "sft")
    # a stacked adapter copied without its record would be scored without its CPT adapter: refused
    shutil.copytree(tmp_path / "sft", tmp_path / "copy")
    (tmp_path / "copy" / "medadapt_adapter.json").unlink()
    with pytest.raises(AdapterMismatchError, match="has no medadapt_adapter.json"):
        build(tmp_path / "copy")
    # a folder that only has the same name is not the same base: its weights are compared
    impostor = tmp_path / "other" / "place" / "tiny"
    shutil.copytree(tiny_qwen, impostor)
    write_scaled_adapter(ModelConfig(name_or_path=str(impostor), load_in_4bit=False, compute_dtype="float32",
                                     base_adapters=[]), tmp_path / "on-impostor", rho=0.01)
    from safetensors.torch import load_file, save_file

    weights = load_file(impostor / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, impostor / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterMismatchError, match="holds other weights"):
        build(tmp_path / "on-impostor", ModelConfig(name_or_path=str(impostor), compute_dtype="float32"))
    with pytest.raises(AdapterMismatchError, match="holds other weights"):  # the base under another name
        build(tmp_path / "sft", ModelConfig(name_or_path=str(impostor), compute_dtype="float32"))
    copy = tmp_path / "copy-of-base"
    shutil.copytree(tiny_qwen, copy)  # the same weights elsewhere: the same base
    shutil.rmtree(tmp_path / "cpt")
    shutil.copytree(tmp_path / "cpt-as-trained", tmp_path / "cpt")  # CPT restored: what SFT was trained on
    build(tmp_path / "sft", ModelConfig(name_or_path=str(copy), compute_dtype="float32"))


def test_a_resume_onto_other_data_or_past_its_schedule_says_so(trained, short_sft_file, tmp_path):
    def fit(data_file, steps, ckpt, out):
        cli(["fit", "--model.model.name_or_path", trained["base"], "--model.model.load_in_4bit", "true",
             "--model.model.compute_dtype", "float32", "--model.lora", json.dumps({"r": 4, "alpha": 8, "dropout": 0.0}),
             "--model.optim.fused", "false", "--model.adapter_dir", str(out / "adapter"),
             "--data", "medadapt.data.reasoning.ReasoningSFTDataModule", "--data.data_files", data_file,
             "--data.max_length", "256", "--data.val_fraction", "0", "--data.batch_size", "2",
             "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt),
             "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                 "init_args": {"dirpath": str(out / "ckpt")}}])])

    other = tmp_path / "other.jsonl"
    rows = [json.loads(x) for x in open(short_sft_file)]
    other.write_text("".join(json.dumps({**r, "Response": r["Response"] + " (edited)"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="other data .*data_files"):
        fit(str(other), 3, trained["ckpt"], tmp_path / "a")
    with pytest.raises(ValueError, match="nothing is left to train.*--on_change retrain"):
        fit(short_sft_file, 1, trained["ckpt"], tmp_path / "b")
    # a run stopped after its last step (no adapter yet): resuming finishes it, training nothing (issue 27)
    fit(short_sft_file, 2, trained["ckpt"], tmp_path / "c")
    from safetensors.torch import load_file

    finished = load_file(tmp_path / "c" / "adapter" / "adapter_model.safetensors")
    original = load_file(trained["adapter"] / "adapter_model.safetensors")
    assert finished.keys() == original.keys() and all(torch.equal(finished[k], original[k]) for k in finished)


def test_an_adapter_with_a_checkpoint_not_trained_from_it_is_refused(trained, tmp_path):
    from medadapt.provenance import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="was not trained from adapter"):
        evaluate(trained, tmp_path / "r", "--model.init_adapter", str(trained["adapter"]), "--ckpt_path",
                 str(trained["ckpt"]))


@pytest.mark.slow  # out of the 5-minute fast set; CI runs it
def test_sigterm_stops_the_running_stage_and_marks_nothing_done(trained, short_sft_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    stage = tmp_path / "stage.yaml"
    stage.write_text(json.dumps(sft_stage(trained["base"], short_sft_file, 100000)))
    spec = tmp_path / "chain.yaml"
    spec.write_text(json.dumps({"work_dir": str(tmp_path / "w"), "stages": [{"name": "s", "config": str(stage)}]}))
    runner = subprocess.Popen([sys.executable, "-m", "medadapt", "multistep", "--config", str(spec)], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    def children(pid):
        out = []
        for stat in os.listdir("/proc"):
            if stat.isdigit():
                try:
                    fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    out.append(int(stat))
        return out

    deadline = time.time() + 120
    while not children(runner.pid) and time.time() < deadline and runner.poll() is None:
        time.sleep(0.2)
    kids = children(runner.pid)
    assert kids, "the stage never started"
    time.sleep(3)  # into its imports
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) != 0
    for pid in kids:  # the fit (and anything it started) is gone, not orphaned to PID 1
        deadline = time.time() + 30
        while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1][:3]
    assert not (tmp_path / "w" / "s" / "DONE.json").exists()


def test_export_never_writes_into_what_it_reads_and_clears_what_it_replaces(tiny_qwen, tmp_path, monkeypatch):
    from medadapt.commands.export import main as export_main
    from medadapt.model_config import ModelConfig
    from medadapt.weights import write_scaled_adapter

    monkeypatch.setenv("MEDADAPT_CACHE", str(tmp_path / "cache"))
    write_scaled_adapter(ModelConfig(name_or_path=tiny_qwen, load_in_4bit=False, compute_dtype="float32",
                                     base_adapters=[]), tmp_path / "a", rho=0.01)
    args = ["--base", tiny_qwen, "--adapter", str(tmp_path / "a"), "--dtype", "float32"]
    for out in (tiny_qwen, str(tmp_path / "a")):
        with pytest.raises(FileExistsError, match="which this export reads"):
            export_main([*args, "--out", out, "--overwrite", "true"])
    stale = tmp_path / "out"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    (stale / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        export_main([*args, "--out", str(stale)])
    export_main([*args, "--out", str(stale), "--overwrite", "true"])
    assert not (stale / "adapter_config.json").exists() and not (stale / "model.safetensors.index.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(stale)  # loads as a plain model


def test_atomic_writes_never_follow_a_planted_link(tmp_path):
    from medadapt.eval.report import summarize, write_results
    from medadapt.files import write_atomic

    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "R"
    out.mkdir()
    for name in ("results.json.tmp", "predictions.jsonl.tmp"):
        (out / name).symlink_to(victim)
    records = [{"task": "t", "id": "0", "gold": 0, "pred": 0, "pred_norm": 0, "loglikelihoods": [-1.0, -2.0]}]
    write_results(str(out), summarize(records), records, {"model": "m"})
    write_atomic(out / "x.json", "{}")
    assert victim.read_text() == "precious"
    assert json.loads((out / "results.json").read_text())["n"] == 1


def test_the_vllm_interpreter_never_comes_from_the_working_directory(tmp_path, monkeypatch):
    from medadapt.eval.vllm_backend import VLLMUnavailableError, vllm_python

    planted = tmp_path / ".venv-vllm" / "bin" / "python"
    planted.parent.mkdir(parents=True)
    planted.write_text("#!/bin/sh\necho pwned\n")
    planted.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDADAPT_VLLM_PYTHON", raising=False)
    try:
        assert vllm_python() != str(planted)
    except VLLMUnavailableError:
        pass
    with pytest.raises(VLLMUnavailableError, match="does not exist"):
        vllm_python(str(tmp_path / "nope" / "python"))
    monkeypatch.setenv("MEDADAPT_VLLM_PYTHON", str(tmp_path / "gone"))
    with pytest.raises(VLLMUnavailableError, match="MEDADAPT_VLLM_PYTHON"):
        vllm_python()


def test_numeric_settings_are_checked_before_anything_loads():
    from medadapt.eval.data import BenchmarkDataModule
    from medadapt.eval.generative import GenerationConfig

    for bad in ({"limit": 0}, {"limit": -1}, {"max_length": 0}, {"max_length": -5}, {"max_length": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BenchmarkDataModule(**bad)
    for bad in ({"temperature": float("inf")}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
                {"samples": 0}, {"max_new_tokens": 0}, {"answer_budget": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationConfig(**bad)


def test_long_prompts_are_counted_in_log_likelihood_mode_and_refused_in_generate_mode(r1_tokenizer):
    from medadapt.eval.data import BenchmarkDataModule

    data = BenchmarkDataModule(tasks=["pubmedqa"], local_dir=str(BENCH), limit=4, max_length=64, allow_partial=True)
    data.connect(r1_tokenizer)
    data.setup("test")
    assert data.settings()["truncated_prompts"] == {"pubmedqa": 4}  # abstracts are longer than 64 tokens
    data = BenchmarkDataModule(tasks=["pubmedqa"], local_dir=str(BENCH), limit=4, max_length=64, mode="generate",
                               allow_partial=True)
    data.connect(r1_tokenizer)
    with pytest.raises(ValueError, match="longer than 64 tokens \\(data.max_length=64"):
        data.setup("test")


def test_custom_tasks_refuse_ambiguous_answers_duplicate_options_and_ids(tmp_path):
    from medadapt.eval.custom_task import CustomTask, load_custom
    from medadapt.eval.tasks import MalformedItemError

    def task(rows, **kw):
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_custom(CustomTask(name="mine", data_files=str(path), **kw))

    ok = {"question": "q?", "options": ["w", "x", "y", "z"], "answer": "B"}
    with pytest.raises(MalformedItemError, match=r"row 0: field 'answer' = 'A' .*ambiguous.*answer_format"):
        task([{"question": "q?", "options": ["B", "A", "C", "D"], "answer": "A"}])
    assert task([{"question": "q?", "options": ["B", "A", "C", "D"], "answer": "A"}],
                answer_format="text")[0].gold == 1
    with pytest.raises(MalformedItemError, match="options A and C are the same text"):
        task([{**ok, "options": ["aspirin", "x", "Aspirin ", "z"]}])
    with pytest.raises(MalformedItemError, match="id 'q1' .*also row 0"):
        task([{**ok, "id": "q1"}, {**ok, "id": "q1"}, {**ok, "id": "q2"}], id_field="id")


def test_results_are_strict_json_and_an_earlier_run_never_looks_current(tmp_path):
    from medadapt.eval.report import set_aside_previous, summarize, write_results

    records = [{"task": "t", "id": "0", "gold": 0, "pred": 0, "pred_norm": 0, "loglikelihoods": [-1.0, -2.0]}]
    write_results(str(tmp_path), summarize(records), records, {"model": "m"})  # one item: no interval

    def refuse(token):
        raise AssertionError(f"{token} in results.json")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert results["tasks"]["t"]["acc_stderr"] is None
    set_aside_previous(str(tmp_path))  # what a new run does first
    assert not (tmp_path / "results.json").exists() and (tmp_path / "previous" / "results.json").exists()


def test_compare_refuses_mixed_protocols_and_edited_results_and_takes_any_folder(tmp_path):
    from medadapt.eval.compare import IncomparableRunsError
    from medadapt.eval.compare import main as compare
    from medadapt.eval.report import summarize, write_results

    def run(folder, mode="loglikelihood", preds=(0, 1)):
        records = [{"task": "t", "id": str(i), "gold": 0, "pred": p, "pred_norm": p, "acc": float(p == 0),
                    "acc_norm": float(p == 0), "loglikelihoods": [-1.0, -2.0]} for i, p in enumerate(preds)]
        write_results(str(folder), summarize(records), records, {"data": {"mode": mode}})

    run(tmp_path / "runs" / "lr=2e-4")
    run(tmp_path / "gen", mode="generate")
    with pytest.raises(IncomparableRunsError, match="asked and read answers differently"):
        compare([str(tmp_path / "runs" / "lr=2e-4"), str(tmp_path / "gen"), "--out", str(tmp_path / "c")])
    compare([str(tmp_path / "runs" / "lr=2e-4"), str(tmp_path / "gen"), "--out", str(tmp_path / "c"),
             "--allow_mixed", "true"])
    assert "| lr=2e-4 |" in (tmp_path / "c.md").read_text()  # the folder, named by its folder name
    results = json.loads((tmp_path / "gen" / "results.json").read_text())
    results["tasks"]["t"]["acc"] = 1.0
    (tmp_path / "gen" / "results.json").write_text(json.dumps(results))
    with pytest.raises(IncomparableRunsError, match="do not belong together"):
        compare([str(tmp_path / "gen"), "--out", str(tmp_path / "d")])


def test_unreadable_records_name_their_file(trained, tmp_path):
    from medadapt.checkpoints import checkpoint_record
    from medadapt.eval.compare import load_run
    from medadapt.files import UnreadableFileError
    from medadapt.model import load_model
    from medadapt.model_config import ModelConfig

    adapter = tmp_path / "a"
    shutil.copytree(trained["adapter"], adapter)
    meta = adapter / "medadapt_adapter.json"
    good = meta.read_text()
    for broken, message in ((good[: len(good) // 2], "not valid JSON"), ('"just a string"', "expected a JSON dict")):
        meta.write_text(broken)
        with pytest.raises(UnreadableFileError, match=f"{meta}.*{message}"):
            evaluate(trained, tmp_path / "r", "--model.init_adapter", str(adapter))
    meta.write_text(good)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UnreadableFileError, match=f"{weights}.*cut short"):
        load_model(ModelConfig(name_or_path=trained["base"], compute_dtype="float32", load_in_4bit=True,
                               base_adapters=[]), adapter=str(adapter), training=False)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(trained["ckpt"].read_bytes()[:1000])
    with pytest.raises(UnreadableFileError, match=f"checkpoint {cut}"):
        checkpoint_record(str(cut))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"n": 1}')
    with pytest.raises(UnreadableFileError, match="no 'tasks' record"):
        load_run(str(tmp_path / "run"))
