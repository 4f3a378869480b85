"""Custom multiple-choice tasks: three field layouts, 2 to 10 options, both modes, clear errors."""

from __future__ import annotations

import json

import pytest
import yaml

from medadapt.eval.custom_task import CustomTask, load_custom
from medadapt.eval.tasks import MalformedItemError

from ..conftest import REPO, connect, tiny_trainer

QUESTIONS = [("Which drug reverses heparin?", ["Vitamin K", "Protamine sulfate", "Idarucizumab", "Andexanet",
                                                "Naloxone"], 1),
             ("First-line therapy for stable angina?", ["Beta blocker", "Digoxin"], 0),
             ("Most common cause of mitral stenosis?", [f"Cause {i}" for i in range(9)] + ["Rheumatic fever"], 9)]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def layouts(tmp_path) -> list[CustomTask]:
    letters = "ABCDEFGHIJ"
    listed = write(tmp_path / "listed.jsonl", [{"stem": q, "choices": o, "correct": letters[g].lower()}
                                               for q, o, g in QUESTIONS])
    keyed = write(tmp_path / "keyed.jsonl", [{"question": q, "options": dict(zip(letters, o)), "answer": o[g]}
                                             for q, o, g in QUESTIONS])
    columns = write(tmp_path / "columns.jsonl", [{"q": q, "opa": o[0], "opb": o[1], "cop": g + 1}
                                                 for q, o, g in QUESTIONS[:2]])  # two columns: two options
    return [CustomTask("listed", listed, question_field="stem", options_field="choices", answer_field="correct"),
            CustomTask("keyed", keyed, answer_format="text"),
            CustomTask("columns", columns, question_field="q", options_field=None, option_fields=["opa", "opb"],
                       answer_field="cop", answer_format="index1")]


def test_every_layout_gives_the_same_items(tmp_path):
    listed, keyed, columns = (load_custom(t) for t in layouts(tmp_path))
    assert [(i.question, i.options, i.gold) for i in listed] == [(i.question, i.options, i.gold) for i in keyed]
    assert [len(i.choices) for i in listed] == [5, 2, 10] and [i.gold for i in listed] == [1, 0, 9]
    assert listed[0].prompt == ("Question: Which drug reverses heparin?\nA. Vitamin K\nB. Protamine sulfate\n"
                                "C. Idarucizumab\nD. Andexanet\nE. Naloxone\nAnswer:")
    assert [(i.options, i.gold) for i in columns] == [(o[:2], g) for _, o, g in QUESTIONS[:2]]
    assert listed[2].choices[-1] == "J"


@pytest.mark.parametrize("mode", ["loglikelihood", "generate"])
def test_custom_tasks_run_in_both_modes_and_are_named_in_results(tiny_qwen, tmp_path, mode):
    from medadapt.eval.data import BenchmarkDataModule
    from medadapt.model_config import ModelConfig
    from medadapt.module import CausalLMModule

    tasks = layouts(tmp_path)[:2]
    module = CausalLMModule(model=ModelConfig(name_or_path=tiny_qwen, compute_dtype="float32",
                                              gradient_checkpointing=False), lora=None, results_dir=str(tmp_path / "r"))
    data = BenchmarkDataModule(tasks=["mmlu_medical_genetics"], local_dir=str(REPO.parent / "shared" / "data" /
                                                                            "benchmarks"), limit=2,
                               custom_tasks=tasks, mode=mode, batch_size=4,
                               generation={"temperature": 0.0, "max_new_tokens": 4, "answer_budget": 2})
    tiny_trainer(tmp_path).test(module, connect(data, module))
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(results["tasks"]) == {"mmlu_medical_genetics", "listed", "keyed"}
    assert results["tasks"]["listed"]["n"] == 2 and results["items_available"]["keyed"] == 3
    preds = [json.loads(line) for line in open(tmp_path / "r" / "predictions.jsonl")]
    sizes = {p["id"]: p["n_choices"] for p in preds if p["task"] == "listed"}
    if mode == "loglikelihood":
        assert all(len(p["loglikelihoods"]) == p["n_choices"] for p in preds)
    assert set(sizes.values()) <= {5, 2, 10}


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("stem"), "row 1: field 'stem' is missing or empty"),
    (lambda r: r.update(choices=["only one"]), "row 1: 1 options; a task has 2 to 10"),
    (lambda r: r.update(correct="Z"), "row 1: field 'correct' = 'Z' is not one of the 2 options"),
    (lambda r: r.update(choices=["a", ""]), "row 1: option B is missing or empty"),
    (lambda r: r.update(choices="not a list"), "row 1: field 'choices' is str, not a list or a dict"),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, edit, message):
    rows = [{"stem": q, "choices": o, "correct": "ABCDEFGHIJ"[g]} for q, o, g in QUESTIONS]
    edit(rows[1])
    path = write(tmp_path / "bad.jsonl", rows)
    task = CustomTask("bad", path, question_field="stem", options_field="choices", answer_field="correct")
    with pytest.raises(MalformedItemError) as err:
        load_custom(task)
    assert path in str(err.value) and message in str(err.value)
    task.on_bad_row = "skip"
    assert len(load_custom(task)) == 2


def test_the_shipped_example_config_runs(tiny_qwen, tmp_path, monkeypatch):
    from medadapt.cli import main as cli

    config = yaml.safe_load((REPO / "configs" / "eval_custom.yaml").read_text())
    task = config["data"]["init_args"]["custom_tasks"][0]
    write(tmp_path / task["data_files"], [{"stem": q, "choices": o, "correct": "ABCDEFGHIJ"[g]}
                                          for q, o, g in QUESTIONS])
    monkeypatch.chdir(tmp_path)
    cli(["test", "--config", str(REPO / "configs" / "eval_custom.yaml"), "--model.model.name_or_path", tiny_qwen,
         "--model.model.compute_dtype", "float32", "--trainer.accelerator", "cpu",
         "--trainer.enable_progress_bar", "false"])
    results = json.loads((tmp_path / "results" / "custom" / "results.json").read_text())
    assert list(results["tasks"]) == ["cardiology"] and results["tasks"]["cardiology"]["n"] == 3
