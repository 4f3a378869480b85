"""The test stage's data: benchmark items → scoring rows (log-likelihood) or chat prompts (generation).

Items come from ``eval/tasks.py`` (the leaderboard tasks); the RAG arm puts retrieved snippets before each
question (``rag/context.py``). Each batch carries what the module needs to score it: its rows, and in
generate mode the generation settings.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import lightning as L

from medadapt.eval.custom_task import CustomTask, load_custom
from medadapt.eval.generative import GenerationConfig
from medadapt.eval.tasks import TASKS, Item, load_task, select
from medadapt.rag.context import RagArmConfig

log = logging.getLogger(__name__)
#: the shortest prompt budget accepted: the templates' own tokens plus a question worth scoring
MIN_LENGTH = 64


class BenchmarkDataModule(L.LightningDataModule):
    """Test-stage data: the leaderboard tasks as lm-eval-exact scoring rows, batched by length.

    Args:
        tasks: Tasks to evaluate (default: all nine leaderboard tasks).
        local_dir: A folder in the layout of ``shared/data/benchmarks`` (MIRAGE/PubMedQA files); null
            loads each task's hub dataset, as lm-evaluation-harness does.
        limit: Evaluate this many items per task (null: the full sets), drawn as ``limit_draw`` says.
        limit_draw: How ``limit`` items are drawn: ``sample`` (default) a seeded random sample, kept in the set's
            order, so a small run covers the whole set; ``first`` the first ``limit`` items, as lm-evaluation-
            harness's ``--limit`` does (use it to compare against an lm-eval run item by item).
        seed: Seed of the ``sample`` draw.
        batch_size: Questions per forward batch (questions are sorted by length to limit padding).
        max_length: The prompt budget in tokens (at least 64). Log-likelihood inputs longer than this are cut from
            the left, as lm-eval does at the model length, counted per task in results.json
            (``truncated_prompts``) and logged; a generative prompt longer than this is an error (cutting a chat
            prompt from the left would remove its template).
        tokenizer: Tokenizer name or path; null takes the model's.
        num_workers: DataLoader worker processes.
        mode: ``loglikelihood`` scores each choice as lm-eval does (the leaderboard's numbers);
            ``generate`` lets the model answer through its chat template (reasoning models think
            first) and extracts the answer; unparsable answers are counted per task.
        generation: Generative mode: backend, sampling (DeepSeek-R1's protocol by default), samples per
            question, thinking budget and budget forcing, instruction (``eval/generative.py``).
        rag: Put retrieved snippets before every question (the RAG method); null for none.
        custom_tasks: Multiple-choice tasks of your own (``eval/custom_task.py``: a file or hub dataset and a
            field mapping), evaluated after ``tasks`` and named in results like them. ``tasks: []`` runs
            only these.
        allow_partial: Evaluate a task whose copy has another number of items than the leaderboard's
            test set (a cut file, another version); false makes that an error. results.json records
            each task's available and evaluated counts either way.
    """

    def __init__(
        self,
        tasks: list[str] = TASKS,
        local_dir: Optional[str] = None,
        limit: Optional[int] = None,
        limit_draw: Literal["sample", "first"] = "sample",
        seed: int = 1234,
        batch_size: int = 8,
        max_length: int = 4096,
        tokenizer: Optional[str] = None,
        num_workers: int = 0,
        mode: Literal["loglikelihood", "generate"] = "loglikelihood",
        generation: Optional[GenerationConfig] = None,
        rag: Optional[RagArmConfig] = None,
        custom_tasks: Optional[list[CustomTask]] = None,
        allow_partial: bool = False,
    ):
        super().__init__()
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"data.limit must be a whole number ≥ 1, or null for the full sets (got {limit!r}); "
                             "a run that scores nothing would leave no results")
        if not isinstance(max_length, int) or max_length < MIN_LENGTH:
            raise ValueError(f"data.max_length must be at least {MIN_LENGTH} tokens (got {max_length!r}): it is the "
                             "prompt's budget, and a shorter one leaves the question out")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"data.batch_size must be ≥ 1 and num_workers ≥ 0 (got {batch_size}, {num_workers})")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {TASKS}")
        self.save_hyperparameters()
        # LightningCLI hands a subclass-mode module's nested dataclasses over as dicts
        self.generation = as_config(GenerationConfig, generation)
        self.rag = as_config(RagArmConfig, rag) if rag is not None else None
        self.custom_tasks = [as_config(CustomTask, t) for t in custom_tasks or []]
        names = list(tasks) + [t.name for t in self.custom_tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique: {names}")
        self.items: list[Item] = []
        self.encoded: list[list] = []
        self.tokenizer = None

    def connect(self, tokenizer) -> None:
        """The evaluated model's tokenizer, handed over by the run: prompts are encoded as the model reads them."""
        self.tokenizer = tokenizer

    def limit_context(self, context: Optional[int]) -> None:
        """The evaluated model's context length, handed over by the run: no prompt longer than the model reads is
        ever scored (a ``data.max_length`` above it is capped there, and says so)."""
        self.context = context
        if context and self.hparams.max_length > context:
            log.warning("data.max_length=%d exceeds the model's context (%d tokens): prompts are held to %d",
                        self.hparams.max_length, context, context)

    @property
    def prompt_limit(self) -> int:
        context = getattr(self, "context", None)
        return min(self.hparams.max_length, context) if context else self.hparams.max_length

    def setup(self, stage: str) -> None:
        if self.items:
            return
        from medadapt.data.sources import named_tokenizer
        from medadapt.eval.generative import gen_row
        from medadapt.eval.scoring import item_rows

        h = self.hparams
        if self.tokenizer is None:
            self.tokenizer = named_tokenizer(h.tokenizer, type(self).__name__)
        self.available: dict[str, int] = {}
        for task in h.tasks:
            items = load_task(task, h.local_dir, h.allow_partial)
            self.available[task] = len(items)
            self.items += select(items, h.limit, h.seed, h.limit_draw)
        for custom in self.custom_tasks:
            items = load_custom(custom)
            self.available[custom.name] = len(items)
            self.items += select(items, h.limit, h.seed, h.limit_draw)
        if self.rag is not None:
            from medadapt.rag.context import with_context

            self.items = with_context(self.items, self.rag, self.tokenizer)
        if not self.items:
            raise ValueError("no benchmark items to evaluate (no tasks and no custom tasks)")
        if h.mode == "generate":
            encoded = [[gen_row(self.tokenizer, it, self.generation)] for it in self.items]
            limit = self.prompt_limit
            long = sorted(((len(r.input_ids), r.item) for (r,) in encoded if len(r.input_ids) > limit),
                          key=lambda x: -x[0])
            if long:
                n, item = long[0]
                raise ValueError(
                    f"{len(long)} generative prompts are longer than {limit} tokens (data.max_length={h.max_length}, "
                    f"the model's context {getattr(self, 'context', None) or 'unknown'}; the longest, "
                    f"{item.task} item {item.id}, has {n} tokens): cutting a chat prompt from the left would remove "
                    "its template; raise data.max_length (within the model's context, with max_new_tokens) or "
                    "evaluate those tasks in log-likelihood mode")
        else:
            encoded = [item_rows(self.tokenizer, it, self.prompt_limit) for it in self.items]
            self.truncated = {}
            for rows in encoded:
                if any(r.cut for r in rows):
                    self.truncated[rows[0].item.task] = self.truncated.get(rows[0].item.task, 0) + 1
            for task, n in self.truncated.items():
                log.warning("%s: %d prompts longer than %d tokens were cut from the left (as lm-eval does at the model "
                            "length); results.json counts them", task, n, self.prompt_limit)
        # longest first, as lm-eval orders requests: padding stays small and a memory error shows at once
        self.encoded = sorted(encoded, key=lambda rows: -max(len(r.input_ids) for r in rows))
        log.info("%d benchmark items (%s), %d forward rows", len(self.items),
                 ", ".join([*h.tasks, *(t.name for t in self.custom_tasks)]),
                 sum(len(e) for e in self.encoded))

    def settings(self) -> dict:
        """Every setting as used (nested configs resolved): what results.json records."""
        from dataclasses import asdict

        out = dict(self.hparams)
        out["generation"] = asdict(self.generation) if self.hparams.mode == "generate" else None
        out["rag"] = asdict(self.rag) if self.rag is not None else None
        out["custom_tasks"] = [asdict(t) for t in self.custom_tasks]
        out["items_available"] = dict(getattr(self, "available", {}))
        out["truncated_prompts"] = dict(getattr(self, "truncated", {}))
        return out

    def test_dataloader(self):
        from functools import partial

        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
        from torch.utils.data import DataLoader

        from medadapt.eval.generative import collate_generate
        from medadapt.eval.scoring import collate_items

        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        # unrepeated: a padded DistributedSampler would score some items twice under DDP
        sampler = UnrepeatedDistributedSampler(self.encoded, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.encoded, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers,
                          collate_fn=partial(collate_generate, pad_id=self.tokenizer.pad_token_id,
                                             generation=self.generation, settings=self.settings())
                          if self.hparams.mode == "generate"
                          else partial(collate_items, pad_id=self.tokenizer.pad_token_id, settings=self.settings()))


def as_config(cls, value):
    """A config dataclass from itself, a dict of its fields (LightningCLI, YAML) or None (its defaults)."""
    if value is None:
        return cls()
    return cls(**value) if isinstance(value, dict) else value
