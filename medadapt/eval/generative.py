"""Generative benchmarking for reasoning models: chat prompt → greedy generation → extracted answer.

DeepSeek-R1-Distill models think before they answer, and log-likelihood scoring of ``" A"`` right
after ``Answer:`` never lets them. In this mode the question goes through the model's chat template,
the model generates up to a token budget, and the answer is read from the text after ``</think>`` by
the rules of ``eval/answers.py``. Anything else is *unparsable*: counted per task in the results, scored
as wrong, and kept with its generation in predictions.jsonl so it can be read.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from medadapt.eval.tasks import INSTRUCTION, OPTION_LETTERS, Item
from medadapt.eval.answers import read_answer


FORCED_ANSWER = "\n</think>\n\nThe final answer is"


@dataclass
class GenerationConfig:
    """How replies are generated in ``generate`` mode. Defaults follow DeepSeek-R1's model card: sampling at
    temperature 0.6, top-p 0.95, no system prompt, the instruction in the user turn, and the reply opened
    with ``<think>\\n``. Every field is written to results.json.

    Args:
        backend: ``hf`` (transformers ``generate``, batched, under Lightning) or ``vllm`` (vLLM's offline
            engine in its own interpreter; see ``eval/vllm_backend.py``).
        max_new_tokens: Thinking budget: tokens per reply before budget forcing (R1-distill models often
            need 2,000+).
        temperature: Sampling temperature; 0 decodes greedily.
        top_p: Nucleus sampling threshold.
        top_k: Top-k filter; 0 is off (DeepSeek's protocol has none). Passed to both backends: transformers would
            otherwise apply its own default of 50 and vLLM none, and the two would sample different distributions.
        samples: Replies per question. pass@1 is their mean correctness (DeepSeek reports it over 64);
            the item's prediction is their majority vote (maj@n). Greedy decoding needs only 1.
        seed: Seed of the sampling.
        open_think: Open the reply with ``<think>\\n`` when the chat template does not (DeepSeek: "enforce
            the model to initiate its response with <think>\\n").
        answer_budget: Budget forcing (s1, m1): when a thought is still open at ``max_new_tokens``, close it
            and ask for the final answer, with this many more tokens; such replies count as ``forced``,
            apart from natural endings. 0 turns it off (a cut-off thought is then unparsable).
        instruction: Sentence after every question (DeepSeek's recommended one asks for a boxed answer;
            the reader does not need the box).
        vllm_python: ``vllm`` backend: the interpreter with vLLM (default: ``$MEDADAPT_VLLM_PYTHON``, this
            one if it has vLLM, or ``.venv-vllm/bin/python``).
        tensor_parallel_size: ``vllm`` backend: GPUs one model is split over.
        enforce_eager: ``vllm`` backend: skip CUDA-graph/compile warm-up (faster start, slower generation).
        vllm_engine_args: ``vllm`` backend: more ``vllm.LLM`` arguments, e.g. ``{data_parallel_size: 8,
            gpu_memory_utilization: 0.85}``.
    """

    backend: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = 4096
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    samples: int = 1
    seed: int = 1234
    open_think: bool = True
    answer_budget: int = 64
    instruction: str = INSTRUCTION
    vllm_python: Optional[str] = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    vllm_engine_args: Optional[dict] = None

    def __post_init__(self) -> None:
        import math

        problems = []
        if not (isinstance(self.samples, int) and self.samples >= 1):
            problems.append(f"samples must be an integer ≥ 1 (got {self.samples!r})")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            problems.append(f"max_new_tokens must be an integer ≥ 1 (got {self.max_new_tokens!r})")
        if not (isinstance(self.answer_budget, int) and self.answer_budget >= 0):
            problems.append(f"answer_budget must be an integer ≥ 0 (got {self.answer_budget!r})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be finite and ≥ 0 (got {self.temperature!r})")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k must be an integer ≥ 0 (0: off; got {self.top_k!r})")
        if not (isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1):
            problems.append(f"tensor_parallel_size must be an integer ≥ 1 (got {self.tensor_parallel_size!r})")
        if problems:
            raise ValueError("generation: " + "; ".join(problems))
        if self.temperature == 0 and self.samples > 1:
            raise ValueError("greedy decoding (temperature 0) gives one reply per question: set samples: 1, or a "
                             "temperature to sample several")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_kwargs(temperature: float, top_p: float = 1.0, top_k: int = 0) -> dict:
    """``generate`` arguments that sample from exactly ``softmax(logits / temperature)`` cut by ``top_p``/``top_k``
    (0: off) and nothing else. Every other logits processor is set to its neutral value: transformers fills what a
    call leaves unset from the model's generation config and then from its own defaults (``top_k`` 50), so a
    distribution-shaping setting in a checkpoint's ``generation_config.json`` would silently change what is sampled.
    Temperature 0 is greedy decoding."""
    if temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": 0.0,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "suppress_tokens": [], "begin_suppress_tokens": []}


@dataclass
class GenRow:
    """One prompt to generate from."""

    item: Item
    input_ids: list[int]
    thinking: bool = False  # the prompt opened a <think> block: the answer follows </think>


def user_message(item: Item, instruction: str = INSTRUCTION) -> str:
    """The question as a user turn; retrieved snippets (RAG arm) come first, as in the scored prompt."""
    if item.options:
        letters = ", ".join(OPTION_LETTERS[: len(item.options)])
        options = "\n".join(f"{k}. {v}" for k, v in zip(OPTION_LETTERS, item.options))
        ask = f"Answer with the letter ({letters}) of the correct option."
        return f"{item.context}{item.question.strip()}\n\n{options}\n\n{ask} {instruction}".strip()
    abstract = "\n".join(item.passages)
    ask = "Answer " + ", ".join(item.choices[:-1]) + " or " + item.choices[-1] + "."
    head = f"Abstract: {abstract}\n\n" if abstract else ""
    return f"{item.context}{head}Question: {item.question.strip()}\n\n{ask} {instruction}".strip()


def gen_row(tokenizer, item: Item, generation: GenerationConfig = GenerationConfig()) -> GenRow:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("generative mode needs a tokenizer with a chat template "
                         f"({getattr(tokenizer, 'name_or_path', tokenizer)!r} has none)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message(item, generation.instruction)}],
                                         add_generation_prompt=True, tokenize=False)
    if generation.open_think and not text.rstrip().endswith("<think>"):
        text += "<think>\n"
    return GenRow(item, tokenizer.encode(text, add_special_tokens=False), text.rstrip().endswith("<think>"))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every row's next token is generated at the same position."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        input_ids[b, width - len(seq) :] = torch.tensor(seq)
        attention_mask[b, width - len(seq) :] = 1
    return input_ids, attention_mask


def collate_generate(batch: list[list[GenRow]], pad_id: int, generation: GenerationConfig = GenerationConfig(),
                     settings: Optional[dict] = None) -> dict:
    """A batch carries what scoring it needs: the rows (items, thinking) and the generation settings."""
    rows = [r for group in batch for r in group]
    input_ids, attention_mask = left_pad([r.input_ids for r in rows], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "gen_rows": rows, "generation": generation,
            "mode": "generate", "settings": settings}


@dataclass
class Reply:
    """One generated reply: its text and how it ended (``natural``: EOS within the budget; ``forced``: the
    thought was closed by budget forcing; ``cut``: the budget ran out with no forcing)."""

    text: str
    ending: str
    tokens: int = 0  # generated tokens (EOS excluded; a forced reply counts its cue and answer too)


@torch.no_grad()
def generate(model, tokenizer, batch: dict) -> list[list[Reply]]:
    """``generation.samples`` replies per row of a left-padded batch, with budget forcing (HF backend)."""
    g: GenerationConfig = batch["generation"]
    eos = tokenizer.eos_token_id
    sampling = sampling_kwargs(g.temperature, g.top_p, g.top_k)
    if not g.greedy:  # reproducible, whatever else ran before
        torch.manual_seed(g.seed + zlib.crc32(f"{batch['gen_rows'][0].item.task}/{batch['gen_rows'][0].item.id}".encode()))
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=g.max_new_tokens, num_return_sequences=g.samples, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=eos, **sampling)
    width = batch["input_ids"].shape[1]
    new = [_until_eos(ids, eos) for ids in out[:, width:].tolist()]
    rows = [r for r in batch["gen_rows"] for _ in range(g.samples)]
    endings = ["natural" if done else "cut" for _, done in new]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in new]
    cue = tokenizer.encode(FORCED_ANSWER, add_special_tokens=False)
    force = [i for i, (row, (ids, done)) in enumerate(zip(rows, new))
             if g.answer_budget and row.thinking and not done and "</think>" not in texts[i]]
    counts = [len(ids) for ids, _ in new]
    if force:
        prompts = [rows[i].input_ids + new[i][0] + cue for i in force]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        more = model.generate(input_ids=ids.to(batch["input_ids"].device), attention_mask=mask.to(batch["input_ids"].device),
                              max_new_tokens=g.answer_budget, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              **sampling)
        for i, answer in zip(force, more[:, ids.shape[1]:].tolist()):
            answer = _until_eos(answer, eos)[0]
            texts[i] = tokenizer.decode(new[i][0] + cue + answer, skip_special_tokens=True)
            endings[i], counts[i] = "forced", counts[i] + len(cue) + len(answer)
    replies = [Reply(t, e, n) for t, e, n in zip(texts, endings, counts)]
    return [replies[k * g.samples : (k + 1) * g.samples] for k in range(len(batch["gen_rows"]))]


def _until_eos(ids: list[int], eos: int) -> tuple[list[int], bool]:
    return (ids[: ids.index(eos)], True) if eos in ids else (ids, False)


# ---- answer extraction (rules in eval/answers.py) -----------------------------------------------------
def read_reply(text: str, item: Item, thinking: bool = False) -> tuple[Optional[int], str]:
    """Index of the chosen answer in ``item.choices`` (None when the reply does not name exactly one), and the
    reader's rule that decided (``eval/answers.py``: boxed, final_statement, lone_choice_line, verdict,
    whole_reply; unparsable or no_answer)."""
    if item.options:
        return read_answer(text, OPTION_LETTERS[: len(item.options)], item.options, thinking)
    return read_answer(text, item.choices, item.choices, thinking)


def extract_answer(text: str, item: Item, thinking: bool = False) -> Optional[int]:
    """Index of the chosen answer in ``item.choices``, or None when the reply does not name exactly one."""
    return read_reply(text, item, thinking)[0]


def decide_generated(item: Item, replies: list[Reply], thinking: bool) -> dict:
    """The item's record: each reply read; ``pred`` is their majority vote (the first-seen answer among ties;
    -1 when none names a choice), ``pass1`` the share of replies that are right."""
    read = [read_reply(r.text, item, thinking) for r in replies]
    preds = [-1 if p is None else p for p, _ in read]
    votes = Counter(p for p in preds if p >= 0)
    pred = max(votes, key=lambda p: (votes[p], -preds.index(p))) if votes else -1
    acc = float(pred == item.gold)
    return {"pred": pred, "pred_norm": pred, "acc": acc, "acc_norm": acc,
            "pass1": sum(p == item.gold for p in preds) / len(preds), "samples": len(preds),
            "unparsable": sum(p < 0 for p in preds), "forced": sum(r.ending == "forced" for r in replies),
            "cut": sum(r.ending == "cut" for r in replies),
            "tokens": sum(r.tokens for r in replies),
            "replies": [{"pred": p, "parse": path, "ending": r.ending, "tokens": r.tokens, "generation": r.text}
                        for p, (_, path), r in zip(preds, read, replies)]}
