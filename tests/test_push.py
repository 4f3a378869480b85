"""``push``: what goes up is exactly the adapter (or merged model), its stack and a card whose metadata the Hub library
parses and whose numbers are the results'; a pushed stack loads to the same model; every refusal is one line.
Offline: ``--dry_run`` writes the upload folder, and the Hub API is replaced by a recorder where the upload is."""

from __future__ import annotations

import json
import shutil

import pytest

from medadapt.commands import push as push_cmd
from medadapt.commands.push import PushError, push
from medadapt.fingerprint import adapter_digest

from .conftest import evaluate


def uploaded(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    """The trained adapter's results (log-likelihood, two PubMedQA items) and the plain base's."""
    root = tmp_path_factory.mktemp("scored")
    evaluate(trained, root / "sft", "--model.init_adapter", str(trained["adapter"]), "--model.model.load_in_4bit", "true")
    evaluate(trained, root / "base")
    return root


@pytest.fixture()
def stack(trained, tmp_path):
    """An adapter recorded as trained on top of the trained one (its own weights: a copy), as CPT→SFT writes it."""
    below, top = tmp_path / "cpt" / "adapter", tmp_path / "sft" / "adapter"
    shutil.copytree(trained["adapter"], below)
    shutil.copytree(trained["adapter"], top)
    meta = json.loads((top / "medadapt_adapter.json").read_text())
    meta["base"].update(base_adapters=[str(below)], base_adapter_digests=[adapter_digest(below)])
    (top / "medadapt_adapter.json").write_text(json.dumps(meta))
    return below, top


def test_dry_run_writes_the_adapter_its_record_and_a_card_with_the_results(trained, scored, short_sft_file, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "up"
    push(str(trained["adapter"]), "me/r1-med-sft", results=[str(scored / "sft")], dry_run=str(out))
    assert uploaded(out) == {"adapter_model.safetensors", "adapter_config.json", "medadapt_adapter.json", "README.md"}
    assert (out / "adapter_model.safetensors").read_bytes() == (trained["adapter"] / "adapter_model.safetensors").read_bytes()

    card = ModelCard.load(out / "README.md")  # the Hub library parses the metadata, model-index included
    assert card.data.library_name == "peft" and "medadapt" in card.data.tags and "qlora" in card.data.tags
    results = json.loads((scored / "sft" / "results.json").read_text())
    got = {(r.dataset_name, r.metric_name.split(" ")[0]): r.metric_value for r in card.data.eval_results}
    assert got == {(task, metric): m[metric] for task, m in results["tasks"].items() for metric in ("acc", "acc_norm")}
    text = card.text
    assert "Smoke-scale run" in text and "2 optimizer steps" in text  # the fixture trained 2 steps: the card says so
    assert "PeftModel.from_pretrained(base, \"me/r1-med-sft\")" in text and "| pubmedqa | 2 |" in text
    record = json.loads((out / "medadapt_adapter.json").read_text())
    assert record["recipe"]["optimizer_steps"] == 2 and record["recipe"]["optim"]["lr"] == 0.05
    assert record["recipe"]["data"]["fingerprint"]  # the data by content
    assert short_sft_file not in (out / "medadapt_adapter.json").read_text()  # no path of this machine's data


def test_a_stack_goes_up_whole_and_the_download_loads_the_same_model(trained, stack, tmp_path):
    from huggingface_hub import ModelCard

    below, top = stack
    out = tmp_path / "up"
    push(str(top), "me/r1-med-cpt-sft", dry_run=str(out))
    assert uploaded(out) == {"adapter_model.safetensors", "adapter_config.json", "medadapt_adapter.json", "README.md",
                             "base_adapters/0-cpt/adapter_model.safetensors", "base_adapters/0-cpt/adapter_config.json",
                             "base_adapters/0-cpt/medadapt_adapter.json"}
    text = ModelCard.load(out / "README.md").text
    assert "CPT→SFT" in text and 'subfolder="base_adapters/0-cpt"' in text and str(below) not in text

    # medadapt loads the download as the stack it was trained as: same scores item by item
    original = evaluate(trained, tmp_path / "original", "--model.init_adapter", str(top), "--model.model.load_in_4bit",
                        "true")
    pushed = evaluate(trained, tmp_path / "pushed", "--model.init_adapter", str(out), "--model.model.load_in_4bit", "true")
    assert [str(out / "base_adapters" / "0-cpt")] == pushed["model"]["base_adapters"]
    lines = [[json.loads(line)["loglikelihoods"] for line in open(tmp_path / run / "predictions.jsonl")]
             for run in ("original", "pushed")]
    assert lines[0] == lines[1] and original["tasks"] == pushed["tasks"]


def test_a_stack_whose_base_adapter_is_gone_or_changed_is_refused(stack, tmp_path):
    below, top = stack
    weights = below / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # retrained, or replaced
    weights.write_bytes(bytes(blob))
    with pytest.raises(PushError, match=f"base adapter {below} holds other weights"):
        push(str(top), "me/x", dry_run=str(tmp_path / "a"))
    shutil.rmtree(below)
    with pytest.raises(PushError, match=f"base adapter {below} .*is not there"):
        push(str(top), "me/x", dry_run=str(tmp_path / "b"))


def test_refusals_each_in_one_line(trained, scored, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(trained["adapter"], bare)
    (bare / "medadapt_adapter.json").unlink()
    cases = [(dict(adapter=str(bare), repo="me/x"), "has no medadapt_adapter.json"),
             (dict(adapter=str(trained["adapter"]), repo="x"), "is not OWNER/NAME"),
             (dict(adapter=str(trained["adapter"]), repo="me/x", results=[str(scored / "base")]),
              "scored .* not .*other arms belong in --comparison"),
             (dict(adapter=str(trained["adapter"]), repo="me/x", results=[str(tmp_path / "nowhere")]), "not found")]
    for k, (kwargs, message) in enumerate(cases):
        with pytest.raises(PushError, match=message) as caught:
            push(**kwargs, dry_run=str(tmp_path / f"out{k}"))
        assert "\n" not in str(caught.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(PushError, match="is not empty"):
        push(str(trained["adapter"]), "me/x", dry_run=str(tmp_path / "full"))


def test_merged_model_goes_up_with_its_card(trained, tmp_path):
    from huggingface_hub import ModelCard

    from medadapt.commands.export import main as export_main

    export_main(["--base", trained["base"], "--adapter", str(trained["adapter"]), "--out", str(tmp_path / "merged"),
                 "--dtype", "float32"])
    out = tmp_path / "up"
    push(str(trained["adapter"]), "me/merged", merged=str(tmp_path / "merged"), dry_run=str(out))
    files = uploaded(out)
    assert files == {p.name for p in (tmp_path / "merged").iterdir() if p.name != "README.md"} | {"README.md"}
    assert not any(name.startswith("adapter_") for name in files)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name is None and "holds the merged model" in card.text


class RecordingApi:
    """HfApi's calls that push makes, recorded; ``held`` is what the repository already holds."""

    def __init__(self, held=(), fail=None):
        self.held, self.fail, self.calls = list(held), fail, []

    def __call__(self, token=None):
        self.token = token
        return self

    def create_repo(self, repo, **kw):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", repo, kw))

    def create_branch(self, repo, **kw):
        self.calls.append(("create_branch", repo, kw))

    def list_repo_files(self, repo, revision=None):
        return [".gitattributes", *self.held]

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": uploaded(__import__("pathlib").Path(
            kw["folder_path"]))}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


@pytest.fixture()
def hub(monkeypatch):
    import huggingface_hub

    def install(api, token="hf_secret"):
        monkeypatch.setattr(huggingface_hub, "HfApi", api)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
        return api
    return install


def test_upload_is_one_commit_of_the_dry_run_folder(trained, hub, tmp_path, caplog):
    api = hub(RecordingApi())
    url = push(str(trained["adapter"]), "me/x", private=True, revision="v1")
    assert url.endswith("/commit/abc") and api.token == "hf_secret"
    (_, _, created), (_, _, branch), (_, _, upload) = api.calls
    assert created["private"] is True and created["exist_ok"] is True and branch["branch"] == "v1"
    push(str(trained["adapter"]), "me/x", dry_run=str(tmp_path / "dry"))
    assert upload["files"] == uploaded(tmp_path / "dry") and upload["delete_patterns"] is None
    assert "hf_secret" not in caplog.text


def test_upload_refusals(trained, hub):
    hub(RecordingApi(held=["README.md", "model.safetensors"]))
    with pytest.raises(PushError, match=r"me/x already holds 2 file\(s\) \(README.md, model.safetensors\): --overwrite"):
        push(str(trained["adapter"]), "me/x")
    api = hub(RecordingApi(held=["README.md"]))
    push(str(trained["adapter"]), "me/x", overwrite=True)  # replaces: the commit deletes what it does not bring
    assert api.calls[-1][2]["delete_patterns"] == ["*"]
    hub(RecordingApi(fail=ConnectionError("Max retries exceeded with url: /api/repos/create\nmore detail")))
    with pytest.raises(PushError, match=r"^pushing to me/x failed \(ConnectionError: Max retries exceeded with url: "
                                        r"/api/repos/create\); no commit was made$"):
        push(str(trained["adapter"]), "me/x")
    hub(RecordingApi(), token=None)
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN"):
        push(str(trained["adapter"]), "me/x")


def test_the_command_says_a_refusal_in_one_line(trained, hub, capsys):
    hub(RecordingApi(), token=None)
    with pytest.raises(SystemExit, match=r"^push: no Hugging Face token") as caught:
        push_cmd.main(["--adapter", str(trained["adapter"]), "--repo", "me/x"])
    assert "\n" not in str(caught.value.code)
