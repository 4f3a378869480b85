"""Reading the answer out of a generated reply: the rules, in the order they are tried.

A reasoning model thinks, then answers; a fine-tuned one may answer in prose without ``\\boxed{}``. The
reader looks only at the text after the last ``</think>`` (a reply whose thought never closed has no
answer) and, there, tries in order:

1. ``\\boxed{…}``: the **last** box that names a choice wins (earlier boxes are drafts).
2. Final-answer statements ("Final answer: C", "The answer is **C**", "答案是 C", "I'll go with C"): the last
   one wins; two *final* statements that disagree make the reply unparsable.
3. Verdicts: "C is correct", "not A but C" (rejections such as "D is wrong" never count as a choice).
4. The whole reply as one short answer: "C", "(c)", "Option C", "C. Aspirin", or an option's text alone.

Inside any of these, a span names a choice by its letter (any case when it stands alone, "Option C",
"(C)"), or by the text of exactly one option; LaTeX and markdown wrappers are stripped first. A span that
names two different choices ("B or C", PubMedQA "yes or maybe") names none: it is skipped, and if nothing
else names a choice the reply is unparsable. Nothing here needs ``\\boxed``: the SFT arms answer in prose.
"""

from __future__ import annotations

import re
from typing import Optional

LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|emph|mbox)\s*\{([^{}]*)\}")
FINAL = re.compile(
    r"(?:\bfinal answer\b|\b(?:the\s+)?(?:correct|best|right|most likely|most appropriate)\s+(?:answer|option|choice)\b"
    r"|\bthe answer\b|\banswer\b|\bI(?:'ll| will| would)? (?:choose|go with|pick|select)\b|答案|正确答案)"
    r"\s*(?:is|would be|should be|must be|=|:|：|是|为)?\s*:?\s*(?P<span>[^\n]{1,160})", re.IGNORECASE)
VERDICT = re.compile(r"(?:\bnot\s+(?:option\s+)?\(?[A-J]\)?\s*,?\s*but\s+(?P<but>[^\n.;]{1,80}))"
                     r"|(?P<affirmed>\b(?:option\s+)?\(?[A-J]\)?)\s+is\s+(?:the\s+)?(?:correct|right|true|best)\b",
                     re.IGNORECASE)
EITHER = re.compile(r"(?:^|[\s(])\(?([A-J])\)?\s*(?:or|and|/|,)\s*(?:option\s+)?\(?([A-J])\b")
REJECTED = re.compile(r"(?:\bnot\s+(?:option\s+)?\(?([A-J])\)?\b)|(?:\b(?:option\s+)?\(?([A-J])\)?\s+is\s+"
                      r"(?:wrong|incorrect|not\b|false|unlikely|ruled out))", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def clean(text: str) -> str:
    """Strip LaTeX text wrappers, math dollars and markdown emphasis, keeping their content."""
    previous = None
    while previous != text:
        previous, text = text, LATEX_WRAPPERS.sub(r"\1", text)
    return re.sub(r"[*_`$]+", "", text)


def boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{…}`` in order, nested braces allowed."""
    found, start = [], 0
    while (at := text.find("\\boxed{", start)) >= 0:
        depth, i = 1, at + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        found.append(text[at + len("\\boxed{") : i - 1])
        start = i
    return found


class Reader:
    """The choices of one item: option letters (A, B, …) with their texts, or bare labels (yes/no/maybe)."""

    def __init__(self, labels: list[str], texts: list[str]):
        self.labels, self.texts = labels, texts
        self.letters = [lab for lab in labels if len(lab) == 1 and lab.isalpha()]

    def letter(self, token: str) -> Optional[int]:
        upper = token.upper()
        return self.labels.index(upper) if upper in self.letters else None

    def span(self, span: str, *, whole: bool = False) -> Optional[int]:
        """The one choice a short span names, or None (nothing, or two different choices).

        ``whole``: the span is the entire reply, so a letter must be all of it or be followed by its own
        option's text ("C. Aspirin"), or a model reciting the options ("A. …\\nB. …") would read as A.
        """
        span = clean(span).strip().strip(" .:;,!")
        if not span:
            return None
        rejected = {self.letter(a or b) for a, b in REJECTED.findall(span)} - {None}
        named: list[int] = []
        if self.letters and any(x != y for x, y in EITHER.findall(span)):
            return None  # "B or C": two choices in one answer
        if self.letters:
            m = re.match(r"^(?:option|choice|answer)?\s*[\(\[]?([A-Za-z])[\)\]]?(?=$|[\s.:,;)\-])\s*[.:)\-]?\s*(.*)$",
                         span, re.IGNORECASE | re.DOTALL)
            if m and self.letter(m.group(1)) is not None:
                index, rest = self.letter(m.group(1)), m.group(2)
                lone = m.group(1).isupper() or not rest or not rest[0].isalpha()
                if whole:
                    fits = not rest or _norm(rest) == _norm(self.texts[index])
                    return index if fits and index not in rejected else None
                if lone and index not in rejected:
                    named.append(index)
            for token in re.findall(r"\boption\s+([A-Za-z])\b", span, re.IGNORECASE):
                if self.letter(token) is not None and self.letter(token) not in rejected:
                    named.append(self.letter(token))
        normalized = f" {_norm(span)} "
        exact = [i for i, t in enumerate(self.texts) if _norm(t) == normalized.strip()]
        if exact:
            named.append(exact[0])
        elif not named:
            named += [i for i, t in enumerate(self.texts) if _norm(t) and f" {_norm(t)} " in normalized
                      and i not in rejected]
        return named[0] if len(set(named)) == 1 else None

    def read(self, reply: str) -> Optional[int]:
        for content in reversed(boxed(reply)):  # 1. the last box that names a choice
            choice = self.span(content, whole=True) if len(content) < 200 else None
            if choice is None:
                choice = self.span(content)
            if choice is not None:
                return choice
        text = clean(reply)
        finals = [(m.group(0), self.span(m.group("span"))) for m in FINAL.finditer(text)]  # 2. final statements
        decided = [(phrase, c) for phrase, c in finals if c is not None]
        explicit = {c for phrase, c in decided if re.match(r"final answer", phrase, re.IGNORECASE)}
        if len(explicit) > 1:
            return None  # two final answers that disagree
        if decided:
            return decided[-1][1]
        verdicts = [self.span(m.group("but") or m.group("affirmed")) for m in VERDICT.finditer(text)]  # 3.
        verdicts = [c for c in verdicts if c is not None]
        if verdicts:
            return verdicts[-1]
        return self.span(text, whole=True)  # 4. the whole reply as one short answer


def read_answer(text: str, labels: list[str], texts: list[str], thinking: bool = False) -> Optional[int]:
    """Index of the chosen answer, or None when the reply does not name exactly one.

    ``thinking``: the prompt opened a ``<think>`` block, so, as when the text itself opens one, an answer
    exists only after ``</think>``.
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif thinking or "<think>" in text:
        return None  # the budget ran out mid-thought: whatever it said so far is not an answer
    return Reader(labels, texts).read(text)
