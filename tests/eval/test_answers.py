"""The answer reader on realistic reply endings: the right choice, or unparsable by a stated rule.

The first block holds the 20 endings issue 13 fed to the first reader (12 were misread); the rest are
shapes seen from SmolLM2 and R1-style models, and the traps each rule exists for.
"""

from __future__ import annotations

import pytest

from medadapt.eval.tasks import PUBMEDQA_CHOICES, Item
from medadapt.eval.generative import extract_answer

MCQ = Item("medqa_4options", "0", "", ["A", "B", "C", "D"], 2, "Which drug should be given first?",
           ["Warfarin", "Heparin infusion", "Aspirin", "Clopidogrel"])
YNM = Item("pubmedqa", "1", "", PUBMEDQA_CHOICES, 0, "Does X improve Y?", passages=["Some abstract."])
A, B, C, D = 0, 1, 2, 3
THOUGHT = "<think>\nLet me weigh A against C. B is tempting.\n</think>\n\n"

ISSUE_CASES = [
    # wrong letters before: the last box is the final one; a final statement outranks a later list
    (r"Draft: \boxed{B}. On reflection the antiplatelet is first. \boxed{C}", C),
    (r"First I thought \boxed{A}, but no: final \boxed{C}.", C),
    ("**Final answer: C. Aspirin**\n\nWhy not the other answers:\nA. Warfarin is too slow.\nB. Heparin is later.", C),
    ("Answer: D is wrong; C is right.", C),
    # plain answers the first reader called unparsable
    ("It is not A but C.", C),
    (r"\boxed{\textbf{C}}", C),
    ("c", C),
    (r"\boxed{c}", C),
    ("Option C", C),
    (r"\boxed{Option C}", C),
    ("The answer is **C**.", C),
    ("答案是 C", C),
    # already right before, kept right
    (r"The answer is \boxed{C}.", C),
    (r"\boxed{\text{C. Aspirin}}", C),
    ("**Final answer: (C)** Aspirin", C),
    ("The correct option is C, aspirin.", C),
    ("Aspirin should be chewed immediately.", C),  # option text only
    ("A patient like this needs reperfusion.", None),  # "A patient" is not option A
    ("Either warfarin or aspirin.", None),  # two options named
    ("C", C),
]


@pytest.mark.parametrize("reply, expected", ISSUE_CASES)
def test_reads_the_issue_endings(reply, expected):
    assert extract_answer(THOUGHT + reply, MCQ, thinking=True) == expected


@pytest.mark.parametrize("reply, thinking, expected", [
    (r"<think>\nThe answer is \boxed{C} probably, but let me check", True, None),  # the budget ran out
    ("<think>\nThe answer is C, but wait", False, None),  # the model opened the block itself
    ("A. Warfarin\nB. Heparin infusion\nC. Aspirin\nStep 1:", False, None),  # reciting the options
    ("Answer: C.", False, C),
    ("C. Aspirin", False, C),
    ("Final answer: B.\n\nActually, final answer: C.", False, None),  # two final answers that disagree
    ("The answer is B or C.", False, None),  # one statement naming two choices
    ("I'll go with option c.", False, C),
    ("Correct answer: (C) Aspirin", False, C),
    ("The most appropriate next step is aspirin (option C).", False, C),
    (r"So the answer is $\boxed{\mathrm{C}}$", False, C),
    ("B is incorrect because heparin comes later. C is correct.", False, C),
    ("The answer is a heparin infusion.", False, B),  # "a" is an article here; the text names B
    ("**C**", False, C),
    ("Therefore, the final answer is: **Option C – Aspirin**", False, C),
])
def test_reads_more_shapes(reply, thinking, expected):
    assert extract_answer(reply, MCQ, thinking) == expected


@pytest.mark.parametrize("reply, expected", [
    (r"</think>\n\boxed{yes}", 0),
    ("</think>\nThe answer is: No.", 1),
    ("</think>\nmaybe", 2),
    ("</think>\n**Yes**", 0),
    ("</think>\nFinal answer: maybe.", 2),
    ("</think>\nYes and no; it depends.", None),  # two labels in one answer: unparsable by rule
    ("</think>\nThe answer is yes or maybe.", None),
])
def test_reads_yes_no_maybe(reply, expected):
    assert extract_answer(reply, YNM, thinking=True) == expected


def test_prose_answers_need_no_box():
    """SFT arms are trained on prose responses (none of the 198 sample responses has a box): a reply that
    names the option in a sentence reads as well as a boxed one."""
    prose = "Given the acute presentation, the first drug to give is aspirin, chewed at once."
    assert extract_answer(THOUGHT + prose, MCQ, thinking=True) == C
    assert extract_answer(THOUGHT + r"\boxed{C}", MCQ, thinking=True) == C
