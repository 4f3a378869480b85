"""The pass-rate filter: keep the questions the starting policy sometimes answers right and sometimes wrong.

A question that all (or none) of G samples answer correctly gives every completion the same reward: its group has
no advantage and no gradient, and it only takes a slot in the batch. Before the first step, each training question
is sampled ``pass_rate_filter.samples`` times with the rollouts' own sampler and settings, and questions whose pass
rate is at or below ``min_rate`` or at or above ``max_rate`` are dropped (counted in the log). Rates are cached by
content — the questions' prompts, the model (base identity, stacked adapters, the adapter being continued), the
sampling settings — in ``$MEDADAPT_CACHE/rl/pass_rates``, so a second run on the same start costs nothing. Under
DDP each rank measures its share and the rates are gathered: every rank keeps the same questions.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from medadapt.files import cache_dir, read_json, write_json
from medadapt.fingerprint import digest_value
from medadapt.rl.rollout import Sampling, reward

log = logging.getLogger(__name__)


def pass_rate_key(module, rows: list, sampling: Sampling, samples: int) -> str:
    """The cache key: every question's prompt, the model being sampled, and how it is sampled."""
    from medadapt.provenance import trained_on

    questions = [[r.item.task, r.item.id, r.item.gold, r.input_ids] for r in rows]
    return digest_value([questions, trained_on(module.resolved_model_cfg), module.init_adapter_digest,
                         asdict(sampling), samples, module.rl_cfg.format_reward])[:24]


def measure(module, rows: list, sampling: Sampling, samples: int, batch_size: int) -> dict[str, float]:
    """Pass rate of each row (``task/id`` → share of ``samples`` completions the reader reads as right)."""
    from tqdm import tqdm

    rates = {}
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc="pass rates", disable=not rows or module.trainer.global_rank != 0):
        part = rows[start : start + batch_size]
        completions = module.sampler.sample(part, samples, sampling)
        reward(completions, part, module.tokenizer, module.rl_cfg)
        for q, row in enumerate(part):
            group = completions[q * samples : (q + 1) * samples]
            rates[f"{row.item.task}/{row.item.id}"] = sum(c.pred == row.item.gold for c in group) / samples
    return rates


def gathered(rates: dict, world: int) -> dict:
    """Every rank's rates (DDP), merged."""
    if world == 1 or not torch.distributed.is_initialized():
        return rates
    parts = [None] * world
    torch.distributed.all_gather_object(parts, rates)
    return {k: v for part in parts for k, v in part.items()}


def filter_by_pass_rate(module, datamodule) -> None:
    """Measure (or read from the cache) the pass rate of every training question, and keep those in range."""
    f = module.rl_cfg.pass_rate_filter
    rows = [group[0] for group in datamodule.train_rows]
    sampling = Sampling.of(module.rl_cfg, f.max_new_tokens)
    path = cache_dir() / "rl" / "pass_rates" / f"{pass_rate_key(module, rows, sampling, f.samples)}.json"
    if path.exists():
        rates = read_json(path, "pass-rate cache")["rates"]
        log.info("pass rates of %d questions read from %s", len(rates), path)
    else:
        trainer = module.trainer
        mine = rows[trainer.global_rank :: trainer.world_size]
        was_training = module.model.training
        with torch.no_grad():
            rates = gathered(measure(module, mine, sampling, f.samples, f.batch_size), trainer.world_size)
        module.model.train(was_training)
        if trainer.is_global_zero:
            write_json(path, {"rates": rates, "samples": f.samples, "sampling": asdict(sampling)})
    keep = [g for g in datamodule.train_rows
            if f.min_rate < rates.get(f"{g[0].item.task}/{g[0].item.id}", 0.5) < f.max_rate]
    never = sum(rates.get(f"{g[0].item.task}/{g[0].item.id}", 0.5) <= f.min_rate for g in datamodule.train_rows)
    always = sum(rates.get(f"{g[0].item.task}/{g[0].item.id}", 0.5) >= f.max_rate for g in datamodule.train_rows)
    if not keep:
        raise ValueError(f"pass_rate_filter dropped every question ({never} at or below {f.min_rate}, {always} at or "
                         f"above {f.max_rate} of {len(rows)}): nothing is left to train on")
    log.warning("pass-rate filter: kept %d of %d training questions (%d answered right by none of %d samples, %d by "
                "all)", len(keep), len(rows), never, f.samples, always)
    datamodule.keep_train_rows(keep)
