"""``python -m medadapt study --config configs/demo/study.yaml``: base vs RAG vs SFT vs CPT→SFT vs SFT+RAG.

The study is the project's question in one command, printing one line per step (each step's own output
goes to ``<work_dir>/logs/``) and the comparison table at the end. It strings together the commands a user
would type, each on its own config: ``index`` (RAG corpus), ``multistep`` (SFT alone; CPT then SFT; it
returns each chain's adapter folder), ``test`` once per method on the same seeded benchmark items (the eval
config with a method's own layer on top: ``<work_dir>/configs/test-<method>.yaml``, written from typed
configs), then ``compare`` (table with 95% CIs, paired McNemar tests against the baseline, chart). Every
step reuses what a previous run built: the index skips embedded documents, finished training stages are
skipped (unfinished ones resume; changed ones are an error or retrained, ``--on_change``), and a method is
re-evaluated unless its ``results.json`` came from the same test command on the same weights and items (content
digests: a retrained adapter is noticed though its folder kept its name). Swapping the demo configs for the full-size ones (configs/study.yaml) is the whole
difference between the laptop demo and the GPU study.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional

import yaml

from medadapt.files import UnreadableFileError, read_json, write_atomic, write_json

log = logging.getLogger(__name__)
METHODS = ["base", "rag", "sft", "cpt_sft", "sft_rag", "sft_rl"]
#: the arms a study runs unless told otherwise (sft_rl, RL after SFT, is optional: add it to --methods)
DEFAULT_METHODS = ["base", "rag", "sft", "cpt_sft", "sft_rag"]


def build_parser():
    from medadapt.console import command_parser
    from medadapt.rag.config import RetrievalConfig

    p = command_parser("study", __doc__, "configs/demo/study.yaml or configs/study.yaml")
    p.add_argument("--work_dir", type=str, default="results/study",
                   help="training chains, per-method results and the comparison go here")
    p.add_argument("--methods", type=list[str], default=DEFAULT_METHODS, help=f"any of {METHODS}")
    p.add_argument("--baseline", type=str, default="base", help="the method the paired tests compare against")
    p.add_argument("--index_config", type=str, help="index/ask config of the RAG corpus (configs/rag.yaml)")
    p.add_argument("--sft_config", type=str, help="fit config of the SFT stage (configs/sft.yaml)")
    p.add_argument("--cpt_config", type=str, help="fit config of the CPT stage (configs/cpt.yaml)")
    p.add_argument("--rl_config", type=Optional[str], default=None,
                   help="fit config of the RL stage after SFT (configs/rl.yaml), for the sft_rl arm")
    p.add_argument("--eval_config", type=str, help="test config: model, tasks, subset (configs/eval.yaml)")
    p.add_argument("--eval_args", type=list[str], default=[], help="extra overrides for every test run")
    p.add_argument("--modes", type=list[Literal["loglikelihood", "generate"]], default=["loglikelihood"],
                   help="how every method is scored: loglikelihood (lm-eval's protocol, the leaderboard's numbers) "
                        "and/or generate (the model thinks and answers, DeepSeek's protocol: the RL arm's headline); "
                        "each mode gets its own table, with its own paired tests, in one comparison")
    p.add_argument("--generate_args", type=list[str], default=[],
                   help="extra overrides for the generate-mode test runs, e.g. "
                        "[\"--data.init_args.generation\", \"{backend: vllm, samples: 4}\"]")
    p.add_argument("--train_args", type=list[str], default=[], help="extra overrides for every fit stage")
    p.add_argument("--eval_in_4bit", type=bool, default=True,
                   help="evaluate every method on the nf4 base the adapters were trained on, so the "
                        "differences are the methods', not quantization's")
    p.add_argument("--retrieval", type=RetrievalConfig, default=RetrievalConfig(),
                   help="the RAG arms' retrieval (the index itself is index_config's)")
    p.add_argument("--max_context_tokens", type=int, default=1024,
                   help="the RAG arms' budget for retrieved snippets, in the evaluated model's tokens")
    p.add_argument("--shared_data", type=Optional[str], default="../shared/data",
                   help="offline data the demo configs read; when absent, every step reads the hub instead")
    p.add_argument("--on_change", type=Literal["error", "retrain"], default="error",
                   help="a trained stage whose config, arguments, base or data changed: error, or retrain it")
    p.add_argument("--push_to", type=Optional[str], default=None,
                   help="OWNER/PREFIX: push every trained arm to OWNER/PREFIX-<arm> with its card, results and the "
                        "comparison (python -m medadapt push); the token is checked before anything trains")
    p.add_argument("--push_private", type=bool, default=False, help="create the pushed repositories private")
    p.add_argument("--push_overwrite", type=bool, default=False,
                   help="replace what the pushed repositories already hold (a rerun of the study)")
    p.add_argument("--push_dry_run", type=Optional[str], default=None,
                   help="write each arm's upload folder into a subfolder of this one instead of uploading")
    return p


def hub_overrides(shared: Optional[str]) -> dict[str, list[str]]:
    """Arguments that point each step at the hub when the shared offline data is not there."""
    if shared is None or Path(shared).exists():
        return {"index": [], "fit": [], "test": []}
    log.warning("%s not found: reading corpus, training data and benchmarks from the hub", shared)
    return {"index": ["--corpus.data_files", "null", "--corpus.dataset", "MedRAG/textbooks", "--corpus.text_fields",
                      "[content]", "--corpus.title_field", "title", "--corpus.id_field", "id"],
            "fit": ["--data.init_args.data_files", "null"],
            "test": ["--data.init_args.local_dir", "null"]}


def step(name: str, work) -> object:
    """Run one step of the study and say so in one line (its own output is in its log file)."""
    import time

    started = time.perf_counter()
    print(f"study: {name} …", flush=True)
    result = work()
    print(f"study: {name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def train(chain: str, stages: list, work: Path, on_change: str = "error") -> str:
    """Run a chain of fits, one line per stage; the final stage's adapter folder (its metadata names the base
    adapters). Each stage's output is in ``<work_dir>/logs/<chain>-<stage>.log``."""
    from medadapt.commands.multistep import run

    done = step(f"train {chain} ({' → '.join(s.name for s in stages)})",
                lambda: run(stages, str(work / chain), log_dir=work / "logs", on_change=on_change))
    for stage in done:
        print(f"study:   {chain}/{stage['stage']}: {stage['outcome']} → {stage['adapter']}", flush=True)
    return done[-1]["adapter"]


def method_config(method: str, adapters: dict[str, str], rag, in_4bit: bool, results: Path) -> dict:
    """What one method changes in the eval config, as a config layered over it (``test --config EVAL --config
    THIS``). An adapter brings its own base: the CPT→SFT adapter's metadata stacks the CPT adapter under it,
    on the base both were trained on. ``rag`` is the ``RagArmConfig`` (its index is index_config's)."""
    from dataclasses import asdict

    model = {"lora": None, "model": {"load_in_4bit": in_4bit}, "results_dir": str(results),
             "init_adapter": adapters.get({"sft": "sft", "sft_rag": "sft", "cpt_sft": "cpt_sft",
                                           "sft_rl": "sft_rl"}.get(method, ""))}
    cfg = {"model": model}
    if method in ("rag", "sft_rag"):
        cfg["data"] = {"init_args": {"rag": asdict(rag)}}
    return cfg


def scored_fingerprint(adapter: Optional[str], shared: Optional[str], eval_config: Optional[str] = None,
                       rag=None) -> dict:
    """What an evaluation scores, by content: the adapter (and, through its metadata, the base and the adapters
    under it), the local benchmark files, the eval config's content (its tasks, limit, protocol: the command names it
    only by path), and for a RAG arm the index it retrieves from (its manifest: what was embedded, by what)."""
    from medadapt.fingerprint import adapter_digest, file_digest, files_digest
    from medadapt.provenance import read_adapter_metadata

    out: dict = {"adapter": None, "trained_on": None, "benchmarks": None,
                 "eval_config": file_digest(eval_config) if eval_config and Path(eval_config).is_file() else None}
    if rag is not None:
        manifest = Path(rag.index.dir) / "manifest.json"
        out["index"] = file_digest(manifest) if manifest.is_file() else f"{rag.index.store}:{rag.index.dir}"
    if adapter:
        out["adapter"] = adapter_digest(adapter)
        base = read_adapter_metadata(adapter).get("base") or {}
        out["trained_on"] = {k: base.get(k) for k in ("base_identity", "base_adapter_digests")}
    bench = Path(shared) / "benchmarks" if shared else None
    if bench is not None and bench.is_dir():
        out["benchmarks"] = files_digest(bench, ["*", "*/*"])
    return out


def current_result(results: Path, command: dict) -> bool:
    """Whether ``results`` holds what ``command`` would produce: the same command on the same content."""
    done = results / "study_command.json"
    if not (results / "results.json").exists() or not done.exists():
        return False
    try:
        return read_json(done, "study record") == command
    except UnreadableFileError as e:
        log.warning("%s; evaluating again", e)
        return False


def run_study(a) -> Path:
    from medadapt.commands.multistep import lock_work_dir

    unknown = set(a.methods) - set(METHODS)
    if unknown or a.baseline not in a.methods:
        raise ValueError(f"methods must be among {METHODS} and include the baseline {a.baseline!r}")
    if a.push_to and a.push_to.count("/") != 1:
        raise ValueError(f"--push_to {a.push_to!r} is not OWNER/PREFIX")
    if a.push_to and a.push_dry_run is None:
        from huggingface_hub import get_token

        if not get_token():  # said now, not after hours of training
            raise ValueError("--push_to needs a Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    work = Path(a.work_dir)
    lock = lock_work_dir(work)
    try:
        return study_steps(a, work)
    finally:
        lock.release()


def push_arms(a, work: Path, adapters: dict[str, str]) -> None:
    """Every arm the study trained (among --methods), to its own repository."""
    from medadapt.commands.push import push, study_pushes

    trained = {arm: adapter for arm, adapter in adapters.items() if arm in a.methods}
    for spec in study_pushes(work, trained, a.modes, a.push_to):
        dry = str(Path(a.push_dry_run) / spec["arm"]) if a.push_dry_run is not None else None
        step(f"push {spec['repo']}", lambda: push(spec["adapter"], spec["repo"], spec["results"], private=a.push_private,
                                                   overwrite=a.push_overwrite, comparison=spec["comparison"],
                                                   dry_run=dry))


def study_steps(a, work: Path) -> Path:
    from medadapt.commands.multistep import Stage, launch
    from medadapt.commands.rag import build_parser as rag_parser
    from medadapt.commands.rag import index_main
    from medadapt.eval.compare import main as compare
    from medadapt.rag.context import RagArmConfig

    hub = hub_overrides(a.shared_data)
    train_args = list(a.train_args) + hub["fit"]
    rag = None
    if {"rag", "sft_rag"} & set(a.methods):
        index_args = ["--config", a.index_config, *hub["index"]]
        parser = rag_parser("index")
        index = parser.instantiate_classes(parser.parse_args(index_args)).index
        rag = RagArmConfig(index=index, retrieval=a.retrieval, max_context_tokens=a.max_context_tokens)
        step("index", lambda: index_main(index_args))  # in-process: indexing never launches DDP workers
    adapters = {}
    if {"sft", "sft_rag", "sft_rl"} & set(a.methods):
        adapters["sft"] = train("sft", [Stage("sft", a.sft_config, train_args)], work, a.on_change)
    if "cpt_sft" in a.methods:
        adapters["cpt_sft"] = train("cpt_sft", [Stage("cpt", a.cpt_config, train_args),
                                                Stage("sft", a.sft_config, train_args, from_previous=True)], work,
                                    a.on_change)
    if "sft_rl" in a.methods:  # RL on top of the SFT arm's adapter (stacked, frozen): SFT is trained once
        if not a.rl_config:
            raise ValueError("the sft_rl arm needs --rl_config (configs/rl.yaml or configs/demo/rl.yaml)")
        adapters["sft_rl"] = train("sft_rl", [Stage("rl", a.rl_config, train_args, base_adapters=[adapters["sft"]])],
                                   work, a.on_change)
    runs: dict[str, list[str]] = {mode: [] for mode in a.modes}
    for mode in a.modes:
        for method in a.methods:
            name = method if mode == "loglikelihood" else f"{method}-{mode}"
            results = work / "results" / name
            layer = method_config(method, adapters, rag, a.eval_in_4bit, results)
            layer_path = work / "configs" / f"test-{name}.yaml"
            extra = [] if mode == "loglikelihood" else ["--data.init_args.mode", mode, *a.generate_args]
            args = ["test", "--config", a.eval_config, "--config", str(layer_path), *a.eval_args, *extra, *hub["test"]]
            # reuse a result only if the same command scored the same content
            command = {"args": args, "config": layer, "scored": scored_fingerprint(
                layer["model"]["init_adapter"], a.shared_data, a.eval_config, rag if method in ("rag", "sft_rag") else None)}
            if not current_result(results, command):
                write_atomic(layer_path, yaml.safe_dump(layer, sort_keys=False))
                (results / "study_command.json").unlink(missing_ok=True)
                step(f"evaluate {name}", lambda: launch(args, work / "logs" / f"test-{name}.log"))
                write_json(results / "study_command.json", command)
            else:
                print(f"study: evaluate {name}: reused {results / 'results.json'}", flush=True)
            runs[mode].append(f"{method}={results}")
    if len(a.modes) == 1:
        compare([*runs[a.modes[0]], "--baseline", a.baseline, "--out", str(work / "comparison")])
    else:
        sections = []
        for mode in a.modes:  # each protocol its own table and paired tests: never a method measured against a protocol
            out = work / f"comparison-{mode}"
            compare([*runs[mode], "--baseline", a.baseline, "--out", str(out)])
            sections.append(f"## {MODE_TITLES[mode]}\n\n{out.with_name(out.name + '.md').read_text()}\n"
                            f"Chart: {out.name}.png\n")
        write_atomic(work / "comparison.md", "\n".join(sections))
    if a.push_to:
        push_arms(a, work, adapters)
    return work / "comparison.md"


#: how each scoring mode is labelled in a study's comparison
MODE_TITLES = {"loglikelihood": "Log-likelihood (lm-evaluation-harness protocol: the leaderboard's numbers)",
               "generate": "Generative (DeepSeek's protocol: the model thinks, then answers; sampled, budget-forced)"}


def main(argv: list[str]) -> None:
    from medadapt.commands.multistep import terminate_on_sigterm

    p = build_parser()
    args = p.parse_args(argv)
    terminate_on_sigterm()
    run_study(p.instantiate_classes(args))
