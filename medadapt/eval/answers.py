"""Reading the answer out of a generated reply: the rules, in the order they are tried.

A reasoning model thinks, then answers; a fine-tuned one may answer in prose without ``\\boxed{}``, and R1
answers in the language it thought in. The reader looks only at the text after the last ``</think>`` (a reply
whose thought never closed has no answer) and, there, tries in order (the name of the rule that decided is the
reply's *parse path*, written to predictions.jsonl and counted per task in results.json):

1. ``boxed``: the **last** ``\\boxed{…}`` that names a choice wins (earlier boxes are drafts).
2. ``final_statement``: final-answer statements in English, Chinese, Spanish, French, German, Portuguese and
   Italian ("The answer is **C**", "答案是 C", "la opción correcta es la C", "Donc la réponse est C", "Die
   richtige Antwort ist C", "a alternativa correta é C", "la risposta corretta è C"). Each statement's span runs
   to the next statement, so the **last** one wins wherever it stands, on its line or a later one. A
   self-correction after it ("Hmm, no", "wait", "actually", "espera", "en fait", "eigentlich", "anzi"…) voids
   it: the choice the correction names instead wins (its verdict, its own last statement or conclusion — "Hmm,
   no — on reflection, …, so A." — or its first sentence that names one), and if it names none the reply is
   unparsable. First-person and hedged picks are final statements too ("I'd go with (c)", "my pick is B", "the
   closest is B", "if I had to choose, B", "elegiría la C", "je choisirais C"), and so is a conclusion word whose
   sentence is a choice alone ("Therefore, B.", "Hence: B", "So, (C)", "it has to be C", "Por lo tanto, C").
3. ``lone_choice_line``: a line that is nothing but a choice ("B", "**B.**", "C. Aspirin"), followed by an
   explanation, not by the next option of a recited list.
4. ``verdict``: "C is correct", "C is the best fit", "C seems most likely", "not A but C", "Also ist C richtig",
   "C est correcte" (rejections such as "D is wrong" never count as a choice).
5. ``whole_reply``: the whole reply as one short answer: "C", "(c)", "Option C", "C. Aspirin", or an option's
   text alone.

Inside any of these, a span names a choice by its letter (any case when it stands alone, "Option C", "la C",
"(C)"), by the text of exactly one option (of two nested texts, "Hypothyroidism" and "Subclinical
hypothyroidism", the more specific one the span contains), or, for an option that is an abbreviation ("DKA"), by
its expansion ("diabetic ketoacidosis", matched as Schwartz & Hearst match long forms); LaTeX and markdown wrappers
are stripped first. A span that names two different choices ("B or C", PubMedQA "yes or maybe") names none: it is
skipped, and if nothing else names a choice the reply is unparsable.
"""

from __future__ import annotations

import re
from typing import Optional

LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|emph|mbox)\s*\{([^{}]*)\}")
_ART = r"(?:(?:the|la|el|le|die|der|das|a|o)\s+|l')?"
FINAL_PHRASE = re.compile(
    r"\bfinal answer\b|\b(?:the\s+)?(?:correct|best|right|most likely|most appropriate)\s+(?:answer|option|choice)\b"
    r"|\bthe answer\b|\banswer\b|最终答案|正确答案|答案"
    # first person, and hedged picks ("I'd go with (c)", "my pick is B", "the closest is B", "if I had to choose, B")
    r"|\bI(?:'ll|'d| will| would| am going to|'m going to)?\s+(?:choose|go with|go for|pick|select|opt for"
    r"|lean towards?)\b|\bI(?:'m| am) going with\b|\bmy (?:final )?(?:pick|choice|answer|vote|bet)\b"
    r"|\b(?:the\s+)?(?:closest|best fit|best match|most plausible|likeliest|most probable)(?:\s+(?:answer|option|choice"
    r"|one|fit))?\b|\bif I (?:had|have|were) to (?:choose|pick|guess)\b"
    # es
    r"|\b(?:la\s+)?respuesta(?:\s+(?:correcta|final))?\b|\b(?:la\s+)?(?:opci[oó]n|alternativa)\s+correcta\b"
    r"|\bme quedo con\b|\belijo\b|\belegir[ií]a\b|\bescoger[ií]a\b|\bme decanto por\b|\b(?:la|el) correct[ao]\b"
    r"|\bsi tuviera que (?:elegir|escoger)\b|\b(?:la|el) m[aá]s probable\b"
    # fr
    r"|\b(?:la\s+)?(?:bonne\s+)?r[ée]ponse(?:\s+(?:finale|correcte))?\b|\b(?:la\s+)?bonne\s+option\b"
    r"|\bl'option\s+correcte\b|\bje (?:choisis|retiens|choisirais|prendrais)\b|\bmon choix\b"
    r"|\bsi je devais choisir\b|\b(?:la|le) plus probable\b"
    # de
    r"|\b(?:die\s+)?(?:richtige\s+|korrekte\s+)?antwort\b|\b(?:die\s+)?richtige\s+(?:option|wahl)\b|\bich w[äa]hle\b"
    # pt
    r"|\b(?:a\s+)?resposta(?:\s+(?:correta|final))?\b|\b(?:a\s+)?(?:alternativa|op[çc][ãa]o)\s+correta\b|\bescolho\b"
    # it
    r"|\b(?:la\s+)?risposta(?:\s+(?:corretta|giusta|finale))?\b|\bl'opzione\s+(?:corretta|giusta)\b"
    r"|\b(?:la\s+)?scelta\s+corretta\b|\bscelgo\b", re.IGNORECASE)
COPULA = re.compile(r"^\s*(?:(?:is|would be|should be|must be|lautet|ist|es|est|sería|serait|wäre|seria|sarebbe|é|è)"
                    r"(?!\w)|=|:|：|是|为)?\s*:?\s*", re.IGNORECASE)
#: a conclusion word whose sentence is nothing but a choice ("Therefore, B.", "Hence: B", "So, (C)", "it has to be C"):
#: counted as a final statement only when the rest of its sentence is a choice alone
CONCLUSION = re.compile(
    r"\b(?:therefore|thus|hence|so|consequently|in conclusion|it (?:has to|must|should|would|will) be"
    r"|por (?:lo )?tanto|entonces|as[ií] que|tiene que ser|donc|ainsi|c'est donc|also|daher|somit|portanto"
    r"|ent[ãa]o|quindi|dunque|pertanto)\b\s*[,:]?\s*", re.IGNORECASE)
CORRECTION = re.compile(
    r"\b(?:hmm+,?\s+no|no,?\s+wait|wait|actually|on second thought|correction|scratch that|i mean|let me reconsider"
    r"|oops|espera|espere|mejor dicho|en realidad|corrijo|attends|attendez|en fait|je corrige|warte|moment mal"
    r"|eigentlich|korrektur|na verdade|aliás|corrigindo|aspetta|anzi|in realtà|correggo)\b|不对|等等",
    re.IGNORECASE)
_OK = (r"(?:the\s+)?best\s+(?:fit|match|answer|option|choice)|(?:the\s+)?most\s+likely"
       r"|(?:the\s+)?(?:correct|right|true|best)|richtig|korrekt|correct[ao]|correcte|corret[ao]|corrett[ao]"
       r"|giust[ao]|la\s+bonne(?:\s+r[ée]ponse)?|la\s+correcta")
_LETTER = r"\(?[A-J]\)?"
VERDICT = re.compile(rf"(?:\bnot\s+(?:option\s+)?{_LETTER}\s*,?\s*but\s+(?P<but>[^\n.;]{{1,80}}))"
                     rf"|(?P<affirmed>\b(?:option\s+|opci[oó]n\s+|l'option\s+|opzione\s+)?{_LETTER})\s+"
                     rf"(?:is|seems|appears|looks|ist|es|est|é|è)\s+(?:{_OK})\b"
                     rf"|\bist\s+(?:option\s+)?(?P<inverted>{_LETTER})\s+(?:richtig|korrekt)\b", re.IGNORECASE)
EITHER = re.compile(r"(?:^|[\s(])\(?([A-J])\)?\s*(?:or|and|/|,|o|ou|oder|e|y|et|und)\s*(?:option\s+)?\(?([A-J])\b")
REJECTED = re.compile(r"(?:\bnot\s+(?:option\s+)?\(?([A-J])\)?\b)|(?:\b(?:option\s+)?\(?([A-J])\)?\s+is\s+"
                      r"(?:wrong|incorrect|not\b|false|unlikely|ruled out))", re.IGNORECASE)
OPTION_WORDS = r"option|choice|answer|opci[oó]n|alternativa|opção|opcao|opzione|antwort|respuesta|réponse|letra|lettre"
#: a correction that retracts (not only a pause such as "wait"): with nothing named instead, nothing is left
RETRACTION = re.compile(r"\bno\b|\bnot\b|nein|\bnon\b|não|不对|scratch that|correction|corrijo|corrige|korrektur|"
                        r"corrigindo|correggo|mejor dicho|anzi", re.IGNORECASE)
#: words a span may open with before its choice ("la C", "die Option C", "it's B", "make that B")
LEAD = re.compile(rf"^(?:(?:it's|it is|it should be|make that|rather|so|thus|therefore|hence|then|no|c'est|es|ist|"
                  rf"é|è)[\s,:]+)*{_ART}(?:(?:{OPTION_WORDS})\s+)?(?=\(?[A-Ja-j]\)?(?:$|[\s.:,;)\-]))",
                  re.IGNORECASE)
STOPWORDS = {"of", "and", "the", "to", "in", "with", "for", "on", "by", "a", "an", "de", "la", "el", "des", "du",
             "der", "die", "das", "y", "et", "und", "e", "di", "do", "da"}
ABBREVIATION = re.compile(r"^[A-Z][A-Z0-9]{1,7}$")


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


def long_form(short: str, words: list[str]) -> bool:
    """Whether ``words`` (content words, in order) spell out the abbreviation ``short``: Schwartz & Hearst's
    right-to-left character match (each letter found in order, the first at a word start), with every word
    opening on one of the abbreviation's letters, in order ("diabetic ketoacidosis" → DKA)."""
    letters = short.lower()
    compound = len(words) == 1 and len(words[0]) >= 3 * len(letters)  # "electrocardiogram" → ECG
    if not (compound or 2 <= len(words) <= len(letters)) or words[0][0].lower() != letters[0]:
        return False
    at = 0
    for w in words:  # the words' initials are an ordered subsequence of the letters
        at = letters.find(w[0].lower(), at)
        if at < 0:
            return False
        at += 1
    text = " ".join(w.lower() for w in words)
    s, i = len(letters) - 1, len(text) - 1
    while s >= 0:
        c = letters[s]
        while i >= 0 and (text[i] != c or (s == 0 and i > 0 and text[i - 1].isalnum())):
            i -= 1
        if i < 0:
            return False
        i, s = i - 1, s - 1
    return True


def expands(short: str, span: str) -> bool:
    """Some window of ``span``'s content words is a long form of ``short``."""
    words = [w for w in re.findall(r"[A-Za-z0-9]+", span) if len(w) >= 3 and w.lower() not in STOPWORDS]
    return any(long_form(short, words[i : i + n]) for n in range(1, len(short) + 1) for i in range(len(words) - n + 1))


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

        ``whole``: the span is the entire reply (or line), so a letter must be all of it or be followed by its
        own option's text ("C. Aspirin"), or a model reciting the options ("A. …\\nB. …") would read as A.
        """
        span = clean(span).strip().strip(" .:;,!")
        if not span:
            return None
        rejected = {self.letter(a or b) for a, b in REJECTED.findall(span)} - {None}
        named: list[int] = []
        if self.letters and any(x != y for x, y in EITHER.findall(span)):
            return None  # "B or C": two choices in one answer
        if self.letters:
            lead = "" if whole else LEAD.match(span).group(0) if LEAD.match(span) else ""
            m = re.match(r"^(?:option|choice|answer)?\s*[\(\[]?([A-Za-z])[\)\]]?(?=$|[\s.:,;)\-])\s*[.:)\-]?\s*(.*)$",
                         span[len(lead):], re.IGNORECASE | re.DOTALL)
            if m and self.letter(m.group(1)) is not None:
                index, rest = self.letter(m.group(1)), m.group(2)
                lone = m.group(1).isupper() or not rest or not rest[0].isalpha()
                if whole:
                    fits = not rest or _norm(rest) == _norm(self.texts[index])
                    return index if fits and index not in rejected else None
                if lone and index not in rejected:
                    named.append(index)
            for token in re.findall(rf"\b(?:{OPTION_WORDS})\s+([A-Za-z])\b", span, re.IGNORECASE):
                if self.letter(token) is not None and self.letter(token) not in rejected:
                    named.append(self.letter(token))
        normalized = f" {_norm(span)} "
        exact = [i for i, t in enumerate(self.texts) if _norm(t) == normalized.strip()]
        if exact:
            named.append(exact[0])
        elif not named:
            named += self.most_specific([i for i, t in enumerate(self.texts) if _norm(t) and f" {_norm(t)} " in normalized
                                         and i not in rejected], normalized)
        if not named:
            named += self.by_expansion(span, rejected)
        return named[0] if len(set(named)) == 1 else None

    def most_specific(self, found: list[int], normalized: str) -> list[int]:
        """Of the options whose texts a span contains, drop one that appears only inside another's ("Hypothyroidism"
        inside "Subclinical hypothyroidism"): the span names the longer, more specific one."""
        keep = []
        for i in found:
            short, rest = f" {_norm(self.texts[i])} ", normalized
            for j in found:
                longer = f" {_norm(self.texts[j])} "
                if j != i and len(longer) > len(short) and short in longer:
                    rest = rest.replace(longer, " | ")
            if short in rest:
                keep.append(i)
        return keep

    def by_expansion(self, span: str, rejected: set) -> list[int]:
        """Options named through an abbreviation: an abbreviated option spelled out in the span ("DKA" ←
        "diabetic ketoacidosis"), or an abbreviation in the span whose long form is an option's text."""
        found = [i for i, t in enumerate(self.texts) if ABBREVIATION.match(t.strip()) and expands(t.strip(), span)]
        for token in set(re.findall(r"\b[A-Z][A-Z0-9]{1,7}\b", span)) - set(self.labels):
            found += [i for i, t in enumerate(self.texts) if not ABBREVIATION.match(t.strip()) and expands(token, t)
                      and len(t.split()) <= len(token)]
        return [i for i in found if i not in rejected]

    def read(self, reply: str) -> tuple[Optional[int], str]:
        """The choice and the rule that found it (``unparsable`` when none)."""
        for content in reversed(boxed(reply)):  # 1. the last box that names a choice
            choice = self.span(content, whole=True) if len(content) < 200 else None
            if choice is None:
                choice = self.span(content)
            if choice is not None:
                return choice, "boxed"
        text = clean(reply)
        found, decided = self.final(text)  # 2. final statements
        if decided:
            return found, "final_statement"
        choice = self.lone_line(text)  # 3.
        if choice is not None:
            return choice, "lone_choice_line"
        choice = self.verdict(text)  # 4.
        if choice is not None:
            return choice, "verdict"
        choice = self.span(text, whole=True)  # 5. the whole reply as one short answer
        return (choice, "whole_reply") if choice is not None else (None, "unparsable")

    def statements(self, text: str) -> list[tuple[int, int]]:
        """(choice, end of its phrase) of every final statement and conclusion in ``text`` that names one, in order.
        Each statement's span runs to the next; a conclusion counts only when its sentence is a choice alone."""
        found = sorted([(m, False) for m in FINAL_PHRASE.finditer(text)] + [(m, True) for m in CONCLUSION.finditer(text)],
                       key=lambda pair: pair[0].start())
        out = []
        for k, (m, strict) in enumerate(found):
            stop = found[k + 1][0].start() if k + 1 < len(found) else len(text)
            body = text[m.end() : stop]
            if strict:
                sentence = re.split(r"(?<=[.!?;])\s|\n", body.strip(), maxsplit=1)[0]
                choice = self.only_choice(sentence.strip())
            else:
                body = body[COPULA.match(body).end():]
                choice = self.span(body.split("\n", 1)[0][:160])
            if choice is not None:
                out.append((choice, m.end()))
        return out

    def final(self, text: str) -> tuple[Optional[int], bool]:
        """The last final statement's choice, after any self-correction that follows it; ``decided`` is whether a
        statement named a choice (a corrected one that names nothing else leaves the reply unparsable)."""
        found = self.statements(text)
        if not found:
            return None, False
        last, last_end = found[-1]
        correction = CORRECTION.search(text, last_end)
        if correction is None:
            return last, True
        instead = self.corrected(text[correction.end() : correction.end() + 400])
        if instead is None and not RETRACTION.search(text[correction.start() : correction.end() + 12]):
            return last, True  # a pause ("wait", "actually") that changes nothing
        return instead, True

    def corrected(self, rest: str) -> Optional[int]:
        """The choice a self-correction names instead: its verdicts, else its last final statement or conclusion
        ("…, so A."), else the first sentence that names one."""
        choice = self.verdict(rest)
        if choice is not None:
            return choice
        found = self.statements(rest)
        if found:
            return found[-1][0]
        for sentence in re.split(r"(?<=[.!?;:—–])\s+|\n+", rest):
            sentence = sentence.strip(" ,:;—–-.")
            choice = self.span(sentence) if sentence else None
            if choice is not None:
                return choice
        return None

    def lone_line(self, text: str) -> Optional[int]:
        """A line that is only a choice, not next to another such line (a recited option list), with more after
        it: the answer first, the explanation below. Several that disagree name none."""
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        lone = [self.only_choice(ln) for ln in lines]
        picks = {c for k, c in enumerate(lone) if c is not None and k + 1 < len(lines)
                 and (k == 0 or lone[k - 1] is None) and lone[k + 1] is None}
        return picks.pop() if len(picks) == 1 else None

    def only_choice(self, line: str) -> Optional[int]:
        """The choice a line is nothing but: its letter ("C", "(c)", "Option C", "C. Aspirin") or an option's
        exact text; None for a line that says more."""
        if len(line) > 80:
            return None
        by_letter = self.span(line, whole=True) if self.letters else None
        if by_letter is not None and re.match(r"^\W*(?:option\s+)?\(?[A-Za-z]\b", clean(line).strip(), re.IGNORECASE):
            return by_letter
        exact = [i for i, t in enumerate(self.texts) if _norm(t) and _norm(t) == _norm(clean(line))]
        return exact[0] if len(exact) == 1 else None

    def verdict(self, text: str) -> Optional[int]:
        verdicts = [self.span(m.group("but") or m.group("affirmed") or m.group("inverted"))
                    for m in VERDICT.finditer(text)]
        verdicts = [c for c in verdicts if c is not None]
        return verdicts[-1] if verdicts else None


def read_answer(text: str, labels: list[str], texts: list[str], thinking: bool = False) -> tuple[Optional[int], str]:
    """Index of the chosen answer (None when the reply does not name exactly one) and the rule that decided.

    ``thinking``: the prompt opened a ``<think>`` block, so, as when the text itself opens one, an answer
    exists only after ``</think>`` (parse path ``no_answer`` otherwise).
    """
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif thinking or "<think>" in text:
        return None, "no_answer"  # the budget ran out mid-thought: whatever it said so far is not an answer
    return Reader(labels, texts).read(text)
