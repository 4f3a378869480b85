"""Multiple-choice log-likelihood scoring, computed exactly as lm-evaluation-harness's HF backend does.

lm-eval scores choice i as the summed log-probability of ``" " + choices[i]`` after the prompt, where
the continuation's tokens are ``encode(prompt + cont)[len(encode(prompt)):]`` (so a merge across the
boundary is handled its way) and the model input is ``(ctx + cont)[:-1]``, left-truncated to the model
length. When every continuation is one token, all choices share that input: one forward pass scores
the whole question instead of one per choice, with identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from medadapt.eval.tasks import Item
from medadapt.model import unwrapped


@dataclass
class Row:
    """One forward pass: ``input_ids`` and, per choice it scores, (choice, continuation tokens)."""

    item: Item
    input_ids: list[int]
    targets: list[tuple[int, list[int]]]
    cut: int = 0  # tokens dropped from the left to fit max_length (lm-eval does the same at the model length)


def lm_eval_encode(tokenizer, text: str) -> list[int]:
    """lm-eval's ``tok_encode``: the tokenizer's own special tokens, unless the text already starts with BOS."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = lm_eval_encode(tokenizer, context + continuation)
    ctx = lm_eval_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def item_rows(tokenizer, item: Item, max_length: int) -> list[Row]:
    pairs = [encode_pair(tokenizer, item.prompt, " " + c) for c in item.choices]  # one prompt: one ctx encoding
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if all(len(cont) == 1 for _, cont in pairs):
        ctx = pairs[0][0]
        return [Row(item, ctx[-max_length:], [(i, cont) for i, (_, cont) in enumerate(pairs)],
                    max(0, len(ctx) - max_length))]
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"{item.task} item {item.id}: choice {item.choices[i]!r} encodes to no tokens")
        whole = ctx + cont
        rows.append(Row(item, whole[-(max_length + 1):][:-1], [(i, cont)], max(0, len(whole) - 1 - max_length)))
    return rows


def collate_rows(rows: list[Row], pad_id: int) -> dict:
    """Right-pad with no attention mask: in a causal model padding after a row cannot change the row's
    logits, and without a mask SDPA keeps its fast causal kernel (lm-eval batches the same way)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
    ends = torch.tensor([len(r.input_ids) for r in rows])
    keep = max(len(cont) for r in rows for _, cont in r.targets)
    return {"input_ids": input_ids, "ends": ends, "keep": keep, "rows": rows}


def collate_items(batch: list[list[Row]], pad_id: int, settings: Optional[dict] = None) -> dict:
    return {**collate_rows([r for rows in batch for r in rows], pad_id), "mode": "loglikelihood", "settings": settings}


@torch.no_grad()
def score_rows(logits: torch.Tensor, rows: list[Row]) -> list[tuple[Item, dict[int, tuple[float, bool]]]]:
    """Per item (in order), per choice: (summed log-likelihood, whether every token is the greedy one).

    ``logits`` holds the last positions of left-padded rows; the last ``n`` of them predict an
    ``n``-token continuation (the input ends with ``cont[:-1]``, or with the context when ``n`` is 1).
    """
    out: dict[tuple[str, str], tuple[Item, dict[int, tuple[float, bool]]]] = {}
    width = logits.shape[1]
    for b, row in enumerate(rows):
        for choice, cont in row.targets:
            n = len(cont)
            logprobs = torch.log_softmax(logits[b, width - n :].float(), dim=-1)
            target = torch.tensor(cont, device=logprobs.device)
            ll = logprobs.gather(-1, target[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == target).all())
            out.setdefault((row.item.task, row.item.id), (row.item, {}))[1][choice] = (ll, greedy)
    return list(out.values())


def forward_rows(model, batch: dict) -> torch.Tensor:
    """Logits of the last ``keep`` positions of each row, (rows, keep, vocab).

    The output head runs on those positions only: the full (rows × length × 152k-vocab) logits tensor
    of a plain forward is the largest allocation of the test stage and almost all of it is unused.
    """
    base = unwrapped(model)  # PEFT: LoRA layers stay active
    hidden = base.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
    keep = batch["keep"]
    ends = batch["ends"].to(hidden.device)
    index = (ends[:, None] - keep + torch.arange(keep, device=hidden.device)).clamp(min=0)
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    return base.get_output_embeddings()(picked)


def argmax_first(values: list[float]) -> int:
    """numpy.argmax semantics: the first index among ties."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def decide(item: Item, lls: list[float]) -> dict:
    """lm-eval's acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character of the choice)."""
    pred = argmax_first(lls)
    pred_norm = argmax_first([ll / len(c) for ll, c in zip(lls, item.choices)])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold)}
