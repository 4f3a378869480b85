"""Push an adapter (or a merged model) to the Hugging Face Hub with a model card carrying its recipe and results.

    python -m medadapt push --adapter checkpoints/sft/adapter --repo me/r1-medical-sft --results '[results/sft]'
    python -m medadapt push --adapter checkpoints/sft/adapter --repo me/r1-medical-sft --dry_run out/  # nothing uploaded
    python -m medadapt push --adapter A --merged exported/sft --repo me/r1-medical-sft-merged          # a merged model

What goes up: the adapter's weights, PEFT config and medadapt record (or, with ``--merged``, the exported model), the
adapters it was trained on top of (CPT→SFT, SFT→RL) in ``base_adapters/<k>-<name>/`` so that the stack loads, and a
generated ``README.md`` (``card.py``). No checkpoint, no optimizer state, no tokenizer copy, no token. The token comes
from ``HF_TOKEN`` or ``huggingface-cli login`` only: never a setting, never logged. ``--dry_run DIR`` writes exactly
the folder that would be uploaded and uploads nothing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from medadapt.files import read_json, write_json
from medadapt.provenance import ADAPTER_METADATA

log = logging.getLogger(__name__)

#: what is uploaded of an adapter folder besides its record (safetensors only: no pickled ``.bin``)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class PushError(RuntimeError):
    """A push that cannot (or must not) happen: said in one line, nothing reported as uploaded."""


def build_parser():
    from medadapt.console import command_parser

    p = command_parser("push", __doc__)
    p.add_argument("--adapter", type=str, required=True, help="exported adapter folder (with medadapt_adapter.json)")
    p.add_argument("--repo", type=str, required=True, help="Hub repository, OWNER/NAME")
    p.add_argument("--results", type=list[str], default=[],
                   help="test-stage results folders of this adapter (or of its merged model) to put in the card")
    p.add_argument("--merged", type=Optional[str], default=None,
                   help="a merged model folder (python -m medadapt export) to upload instead of the adapter")
    p.add_argument("--private", type=bool, default=False, help="create the repository private")
    p.add_argument("--revision", type=Optional[str], default=None, help="push to this branch (created if needed)")
    p.add_argument("--overwrite", type=bool, default=False,
                   help="the repository (or branch) may already hold files: replace them all; otherwise an error")
    p.add_argument("--comparison", type=Optional[str], default=None,
                   help="a comparison.md (compare or study) to add to the card as a section")
    p.add_argument("--dry_run", type=Optional[str], default=None,
                   help="write the folder that would be uploaded into this (empty) folder and upload nothing")
    return p


def adapter_record(adapter: Path) -> dict:
    """The adapter's medadapt record: without one, what it is, how it was trained and what it stacks on is unknown."""
    if not (adapter / "adapter_config.json").exists() or not (adapter / "adapter_model.safetensors").exists():
        raise PushError(f"no PEFT adapter at {adapter} (adapter_config.json and adapter_model.safetensors expected)")
    if not (adapter / ADAPTER_METADATA).exists():
        raise PushError(f"{adapter} has no {ADAPTER_METADATA}: what it was trained on, how and on what data is unknown, "
                        "so no card can say it; push the adapter folder `fit` exported")
    return read_json(adapter / ADAPTER_METADATA, "adapter metadata")


def base_adapters(adapter: Path, meta: dict) -> list[tuple[str, Path]]:
    """The adapters stacked under this one, in order, as (subfolder name, folder): each found with its record, and
    each the very adapter (by digest) this one was trained on top of."""
    from medadapt.fingerprint import adapter_digest

    base = meta.get("base") or {}
    paths, digests = list(base.get("base_adapters") or []), list(base.get("base_adapter_digests") or [])
    out = []
    for k, path in enumerate(paths):
        folder = adapter / path if base.get("base_adapters_relative") else Path(path)  # a downloaded push
        if not (folder / "adapter_config.json").exists() or not (folder / ADAPTER_METADATA).exists():
            raise PushError(f"base adapter {path} (stacked under this adapter) is not there, or has no "
                            f"{ADAPTER_METADATA}: the pushed stack would not load; push from where it is, or restore it")
        if k >= len(digests) or adapter_digest(folder) != digests[k]:
            raise PushError(f"base adapter {path} holds other weights than the adapter was trained on top of: it was "
                            "retrained or replaced since, and the pushed stack would compute something else")
        out.append((f"{k}-{folder.parent.name if folder.name == 'adapter' else folder.name}", folder))
    return out


def scored_results(folders: list[str], adapter: Path, merged: Optional[Path]) -> list[tuple[str, dict]]:
    """Each results folder's summary (recomputed from its predictions), refused unless it scored these weights:
    the adapter by digest, or the merged folder."""
    from medadapt.eval.compare import load_run
    from medadapt.fingerprint import adapter_digest
    from medadapt.provenance import same_model

    digest, out = adapter_digest(adapter), []
    for folder in folders:
        try:
            summary = load_run(folder)[0]
        except Exception as e:  # missing, unreadable or edited: the card must not carry it
            raise PushError(f"--results {folder}: {e}") from None
        model = (summary.get("model") or {}).get("name_or_path")
        scored = summary.get("adapter_digest") or (adapter_digest(summary["adapter"]) if summary.get("adapter") and
                                                   Path(summary["adapter"]).exists() else None)
        if scored != digest and not (merged is not None and same_model(model, str(merged))):
            raise PushError(f"--results {folder} scored {summary.get('adapter') or model}, not {adapter}"
                            + (f" or {merged}" if merged else "") + ": a card carries its own model's numbers only "
                            "(other arms belong in --comparison)")
        out.append((Path(folder).name, summary))
    return out


def shareable(meta: dict, stack: list[str]) -> dict:
    """A record as uploaded. Its base adapters point into the repository (``stack``: paths relative to the adapter's
    own folder, ``base_adapters_relative``: medadapt resolves them against the downloaded folder), so medadapt loads
    the stack from a download; the recipe's local paths go as file names only (the data's identity is its
    fingerprint). The base model's name stays as trained: loading compares it."""

    def names(value):
        if isinstance(value, dict):
            return {k: names(v) for k, v in value.items()}
        if isinstance(value, list):
            return [names(v) for v in value]
        if isinstance(value, str) and value.startswith(("/", "~", "./", "../")):
            return Path(value).name
        return value

    base = dict(meta.get("base") or {})
    if base.get("base_adapters"):
        base.update(base_adapters=stack, base_adapters_relative=True)
    return {**names({k: v for k, v in meta.items() if k != "base"}), "base": base}


def prepare(adapter: str, repo: str, results: list[str], merged: Optional[str], comparison: Optional[str],
            dest: Path) -> list[str]:
    """Check everything, then write into ``dest`` exactly what is uploaded; the relative paths written."""
    from medadapt.commands.card import model_card

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PushError(f"--repo {repo!r} is not OWNER/NAME")
    folder, merged_dir = Path(adapter), Path(merged) if merged else None
    meta = adapter_record(folder)
    if merged_dir is not None and not (merged_dir / "medadapt_export.json").exists():
        raise PushError(f"--merged {merged} has no medadapt_export.json: not a folder `python -m medadapt export` wrote")
    stack = [] if merged_dir is not None else base_adapters(folder, meta)
    summaries = scored_results(results, folder, merged_dir)
    if comparison and not Path(comparison).is_file():
        raise PushError(f"--comparison {comparison} is not a file")
    card = model_card(repo, meta, summaries, [name for name, _ in stack], merged_dir is not None,
                      Path(comparison).read_text(encoding="utf-8") if comparison else None)
    written = []
    if merged_dir is not None:
        for path in sorted(p for p in merged_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.name != "README.md":
                shutil.copy2(path, dest / path.name)
                written.append(path.name)
    else:
        for name, source in [("", folder), *[(f"base_adapters/{n}/", f) for n, f in stack]]:
            (dest / name).mkdir(parents=True, exist_ok=True)
            for file in ADAPTER_FILES:
                shutil.copy2(source / file, dest / name / file)
            written += [name + file for file in ADAPTER_FILES]
        names = [n for n, _ in stack]
        write_json(dest / ADAPTER_METADATA, shareable(meta, [f"base_adapters/{n}" for n in names]), indent=2)
        for k, (name, source) in enumerate(stack):  # each base adapter's record, its own stack beside it
            record = read_json(source / ADAPTER_METADATA, "adapter metadata")
            write_json(dest / "base_adapters" / name / ADAPTER_METADATA,
                       shareable(record, [f"../{n}" for n in names[:k]]), indent=2)
        written += [ADAPTER_METADATA, *(f"base_adapters/{n}/{ADAPTER_METADATA}" for n in names)]
    (dest / "README.md").write_text(card, encoding="utf-8")
    return sorted(written + ["README.md"])


def upload(folder: Path, repo: str, private: bool, revision: Optional[str], overwrite: bool) -> str:
    """One Hub commit of ``folder`` (a commit is all or nothing); its URL. Every failure is one line."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login` (medadapt takes the token "
                        "from there only, never from a config)")
    api = HfApi(token=token)
    where = f"{repo}{'@' + revision if revision else ''}"
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        held = [f for f in api.list_repo_files(repo, revision=revision) if f != ".gitattributes"]
        if held and not overwrite:
            raise PushError(f"{where} already holds {len(held)} file(s) ({', '.join(held[:3])}"
                            f"{', …' if len(held) > 3 else ''}): --overwrite true replaces them, --revision BRANCH "
                            "pushes beside them")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, revision=revision,
                                 commit_message="medadapt push", delete_patterns=["*"] if held else None)
    except PushError:
        raise
    except Exception as e:  # network, auth, quota: one line, and no claim that anything was uploaded
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise PushError(f"pushing to {where} failed ({type(e).__name__}: {reason}); no commit was made") from None
    return str(getattr(info, "commit_url", None) or info)


def push(adapter: str, repo: str, results: list[str] = (), merged: Optional[str] = None, private: bool = False,
         revision: Optional[str] = None, overwrite: bool = False, comparison: Optional[str] = None,
         dry_run: Optional[str] = None) -> str:
    """Upload (or, with ``dry_run``, write) one adapter or merged model with its card; where it went."""
    import tempfile

    from medadapt.files import UnsafePathError, output_folder

    if dry_run is not None and Path(dry_run).is_dir() and any(Path(dry_run).iterdir()):
        raise PushError(f"--dry_run {dry_run} is not empty: give an empty folder (what would be uploaded is written "
                        "there, and only that)")
    with tempfile.TemporaryDirectory(prefix="medadapt-push-") as tmp:
        files = prepare(adapter, repo, list(results), merged, comparison, Path(tmp))  # every check before any write
        if dry_run is None:
            return upload(Path(tmp), repo, private, revision, overwrite)
        try:
            dest = output_folder(dry_run, "--dry_run folder")
        except UnsafePathError as e:
            raise PushError(str(e)) from None
        for child in Path(tmp).iterdir():  # the children: the temporary folder's own mode (0700) stays behind
            (shutil.copytree if child.is_dir() else shutil.copy2)(child, dest / child.name)
    log.info("dry run: %d file(s) for %s in %s; nothing uploaded", len(files), repo, dest)
    return str(dest)


def study_pushes(work: Path, adapters: dict[str, str], modes: list[str], prefix: str) -> list[dict]:
    """What ``study --push_to OWNER/PREFIX`` pushes: every adapter the study trained, to ``OWNER/PREFIX-<arm>``,
    with its results in every mode and the study's comparison as a section of its card."""
    comparison = work / "comparison.md"
    out = []
    for arm, adapter in adapters.items():
        folders = [work / "results" / (arm if mode == "loglikelihood" else f"{arm}-{mode}") for mode in modes]
        out.append({"arm": arm, "adapter": adapter, "repo": f"{prefix}-{arm.replace('_', '-')}",
                    "results": [str(f) for f in folders if (f / "results.json").exists()],
                    "comparison": str(comparison) if comparison.exists() else None})
    return out


def main(argv: list[str]) -> None:
    a = build_parser().parse_args(argv)
    try:
        where = push(a.adapter, a.repo, a.results, a.merged, a.private, a.revision, a.overwrite, a.comparison,
                     a.dry_run)
    except PushError as e:
        raise SystemExit(f"push: {e}") from None
    print(f"{'dry run: wrote' if a.dry_run else 'pushed'} {a.repo}: {where}")
