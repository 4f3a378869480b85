"""Runs lm-evaluation-harness itself on hub-layout copies of a few shared items (test-only dependency)."""

from __future__ import annotations

import json
from pathlib import Path

from medadapt.eval.tasks import PUBMEDQA_CHOICES, Item


def hub_doc(item: Item) -> dict:
    """The item in the layout of the hub dataset lm-eval reads for its task."""
    if item.task == "medqa_4options":
        return {"sent1": item.question, **{f"ending{i}": o for i, o in enumerate(item.options)}, "label": item.gold}
    if item.task == "medmcqa":
        return {"question": item.question, **dict(zip(("opa", "opb", "opc", "opd"), item.options)), "cop": item.gold}
    if item.task == "pubmedqa":
        return {"QUESTION": item.question, "CONTEXTS": item.passages, "final_decision": PUBMEDQA_CHOICES[item.gold]}
    return {"question": item.question, "choices": item.options, "answer": item.gold}


OFFICIAL = {"medqa_4options": "medqa/medqa.yaml", "medmcqa": "medmcqa/medmcqa.yaml",
            "pubmedqa": "pubmedqa/pubmedqa.yaml", **{f"mmlu_{s}": f"mmlu/default/mmlu_{s}.yaml" for s in
                                                      ("anatomy", "clinical_knowledge", "college_biology",
                                                       "college_medicine", "medical_genetics", "professional_medicine")}}


def write_task_yamls(docs_by_task: dict[str, list[dict]], workdir: Path):
    """lm-eval's own task YAMLs (``include``d unchanged), pointed at local JSONL instead of the hub."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    names = []
    for task, docs in docs_by_task.items():
        data = workdir / f"{task}.jsonl"
        data.write_text("\n".join(json.dumps(d) for d in docs))
        cfg = {"include": str(tasks_dir / OFFICIAL[task]), "task": f"ref_{task}", "dataset_path": "json",
               "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
               "training_split": None, "validation_split": None, "fewshot_split": None, "tag": None}
        (workdir / f"ref_{task}.yaml").write_text(yaml.safe_dump(cfg))
        names.append(f"ref_{task}")
    return names, TaskManager(include_path=str(workdir))


def run_lm_eval(model_dir: str, docs_by_task: dict[str, list[dict]], workdir: Path) -> dict[str, list[dict]]:
    import lm_eval

    names, task_manager = write_task_yamls(docs_by_task, workdir)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=names,
                                  task_manager=task_manager, num_fewshot=0, batch_size=1, log_samples=True,
                                  device="cpu")
    return {name[len("ref_"):]: samples for name, samples in res["samples"].items()}
