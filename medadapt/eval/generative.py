"""Generative benchmarking for reasoning models: chat prompt → greedy generation → extracted answer.

DeepSeek-R1-Distill models think before they answer, and log-likelihood scoring of ``" A"`` right
after ``Answer:`` never lets them. In this mode the question goes through the model's chat template,
the model generates up to a token budget, and the answer is read from the text after ``</think>``:
``\\boxed{…}`` first (DeepSeek's recommended instruction asks for it), then "answer is X" phrases, then
a bare option letter, then an option's text. Anything else is *unparsable*: counted per task in the
results, scored as wrong, and kept with its generation in predictions.jsonl so it can be read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from medadapt.data.benchmarks import INSTRUCTION, LETTERS, Item


@dataclass
class GenRow:
    """One prompt to generate from."""

    item: int
    input_ids: list[int]
    thinking: bool = False  # the template opened a <think> block (R1-distill): the answer follows </think>


def user_message(item: Item, instruction: str = INSTRUCTION) -> str:
    """The question as a user turn; retrieved snippets (RAG arm) come first, as in the scored prompt."""
    if item.options:
        options = "\n".join(f"{k}. {v}" for k, v in zip(LETTERS, item.options))
        ask = "Answer with the letter of the correct option."
        return f"{item.context}{item.question.strip()}\n\n{options}\n\n{ask} {instruction}".strip()
    abstract = "\n".join(item.passages)
    ask = "Answer " + ", ".join(item.choices[:-1]) + " or " + item.choices[-1] + "."
    head = f"Abstract: {abstract}\n\n" if abstract else ""
    return f"{item.context}{head}Question: {item.question.strip()}\n\n{ask} {instruction}".strip()


def gen_row(tokenizer, item: Item, index: int, instruction: str = INSTRUCTION) -> GenRow:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("generative mode needs a tokenizer with a chat template "
                         f"({getattr(tokenizer, 'name_or_path', tokenizer)!r} has none)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(item, instruction)}],
                                         add_generation_prompt=True, tokenize=False)
    return GenRow(index, tokenizer.encode(text, add_special_tokens=False), text.rstrip().endswith("<think>"))


def collate_generate(batch: list[list[GenRow]], pad_id: int) -> dict:
    """Left-pad, so every row's next token is generated at the same position."""
    batch = [r for rows in batch for r in rows]
    width = max(len(r.input_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, r in enumerate(batch):
        input_ids[b, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
        attention_mask[b, width - len(r.input_ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "gen_rows": batch}


@torch.no_grad()
def generate(model, tokenizer, batch: dict, max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy continuations of a left-padded batch: (text, whether it ended with EOS within the budget)."""
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    results = []
    for ids in new:
        finished = tokenizer.eos_token_id in ids
        if finished:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        results.append((tokenizer.decode(ids, skip_special_tokens=True), finished))
    return results


# ---- answer extraction -----------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{…}``, nested braces allowed."""
    found, start = [], 0
    while (at := text.find("\\boxed{", start)) >= 0:
        depth, i = 1, at + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        found.append(text[at + len("\\boxed{") : i - 1])
        start = i
    return found


def _choice_in(span: str, item: Item, strict: bool = False) -> Optional[int]:
    """The choice a short answer span names: an option letter, or a choice/option text, or None.

    ``strict`` (a whole answer rather than the span after "answer is"): a letter counts only as the whole
    answer ("B", "(B)", "B.") or followed by that very option's text, so neither "A patient with…" nor a
    model reciting the option list ("A. …\nB. …") is read as option A.
    """
    span = re.sub(r"\\text\{([^}]*)\}", r"\1", span).strip().strip("*$ ")
    if item.options:
        if strict:
            m = re.match(r"^\(?([A-D])(?:[\).:]\s*(.*))?$", span, re.DOTALL)
            if m and (not m.group(2) or _norm(m.group(2)) == _norm(item.options[LETTERS.index(m.group(1))])):
                return LETTERS.index(m.group(1))
        else:
            m = re.match(r"^\(?([A-D])(?:[\).:\s,]|$)", span)
            if m:
                return LETTERS.index(m.group(1))
        texts = item.options
    else:
        texts = item.choices
    normalized = _norm(span)
    exact = [i for i, t in enumerate(texts) if _norm(t) == normalized]
    if len(exact) == 1:
        return exact[0]
    words = f" {normalized} "
    contained = [i for i, t in enumerate(texts) if _norm(t) and f" {_norm(t)} " in words]
    return contained[0] if len(contained) == 1 else None


ANSWER_PHRASE = re.compile(r"(?:final answer|correct answer|correct option|the answer|answer)\s*(?:is|would be|:)?\s*:?\s*"
                           r"([^\n]{1,120})", re.IGNORECASE)


def extract_answer(text: str, item: Item, thinking: bool = False) -> Optional[int]:
    """Index of the chosen answer in ``item.choices``, or None when the text does not name exactly one.

    ``thinking``: the prompt opened a ``<think>`` block (newer R1 templates do; older ones leave it to the
    model), so, as when the text itself opens one, an answer exists only after ``</think>``.
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif thinking or "<think>" in text:
        return None  # the budget ran out mid-thought: whatever it said so far is not an answer
    for span in reversed(_boxed(text)):
        choice = _choice_in(span, item)
        if choice is not None:
            return choice
    for m in reversed(list(ANSWER_PHRASE.finditer(text))):
        choice = _choice_in(m.group(1), item)
        if choice is not None:
            return choice
    return _choice_in(text, item, strict=True)


def decide_generated(item: Item, text: str, finished: bool, thinking: bool) -> dict:
    pred = extract_answer(text, item, thinking)
    pred = -1 if pred is None else pred
    acc = float(pred == item.gold)
    return {"pred": pred, "pred_norm": pred, "acc": acc, "acc_norm": acc, "unparsable": pred < 0,
            "finished": finished, "generation": text}
