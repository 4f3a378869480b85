"""The answer reader on realistic reply endings: the right choice, or unparsable by a stated rule.

The first block holds the 20 endings issue 13 fed to the first reader (12 were misread); then shapes seen from
SmolLM2 and R1-style models and the traps each rule exists for; then, per class issue 20 found misread, ten or
more endings written for this test (none of them the issue's own examples).
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
    ("Final answer: B.\n\nActually, final answer: C.", False, C),  # the last final statement wins
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


# ---- issue 20: four classes of endings a person reads at once -----------------------------------------------
CORRECTED = [  # 1. a final statement corrected later, on its line or after it: the correction wins
    ("The answer is A. Wait, no: with his kidney failure warfarin is out, so the answer is C.", C),
    ("The answer is B, hmm, no, heparin comes second; the answer is C.", C),
    ("So the final answer is D. Actually, clopidogrel is only added later, the answer is C.", C),
    ("Answer: A. On second thought, the correct answer is C.", C),
    ("The answer is B.\n\nWait, no. Rereading the stem, C is correct.", C),
    ("I'll go with B. Hmm, no, make that C.", C),
    ("The correct option is D... no wait, it's C.", C),
    ("The answer is A. Scratch that: aspirin first, so C.", C),
    ("Final answer: B. Correction: C.", C),
    ("The answer is C. Actually, aspirin is exactly what the guideline gives first.", C),  # a pause, same answer
    ("The answer is C. Wait, no.", None),  # retracted, nothing named instead
    ("La respuesta es A. Espera, no: la respuesta correcta es C.", C),
    ("La réponse est B. En fait, non : la bonne réponse est C.", C),
]

LONE_LINE = [  # 2. a bare choice on its own line, then an explanation
    ("C\n\nWhy: aspirin reduces mortality when chewed at once.", C),
    ("**C**\n\nExplanation: heparin follows, warfarin is for later.", C),
    ("C.\n\nAspirin is given first because it acts within minutes.", C),
    ("(C)\n\nReasoning: antiplatelet therapy first.", C),
    ("C. Aspirin\n\nThe other drugs come later in the pathway.", C),
    ("Option C\nBecause it is the fastest-acting antiplatelet.", C),
    ("c\n\nrationale: chew 325 mg right away.", C),
    ("B\n\nWhy: in this setting anticoagulation with heparin comes first.", B),
    ("\n\nD\n\nClopidogrel is given when aspirin cannot be.", D),
    ("Heparin infusion\n\nIt prevents extension of the clot.", B),
    ("A. Warfarin\nB. Heparin infusion\nC. Aspirin\nD. Clopidogrel\n\nLet me think.", None),  # a recited list
    ("C\n\nB\n\nI am not sure.", None),  # two lone choices that disagree
]

LANGUAGES = [  # 3. final statements in the languages R1 answers in
    ("Por lo tanto, la respuesta correcta es la C.", C),
    ("Respuesta final: C", C),
    ("Así que me quedo con la opción C.", C),
    ("Donc la bonne réponse est C : l'aspirine.", C),
    ("Réponse finale : C", C),
    ("Je choisis l'option C.", C),
    ("Die richtige Antwort lautet C.", C),
    ("Antwort: C (Aspirin)", C),
    ("Also ist C richtig.", C),
    ("Portanto, a alternativa correta é a C.", C),
    ("A resposta final é C.", C),
    ("Quindi la risposta corretta è la C.", C),
    ("Risposta: C", C),
    ("L'opzione corretta è C.", C),
    ("最终答案：C", C),
    ("Por lo tanto, la respuesta es B o C.", None),  # two choices in one statement, in any language
]

ABBREVIATED = Item("medqa_4options", "2", "", ["A", "B", "C", "D"], 1, "What is the diagnosis?",
                   ["HHS", "DKA", "SIADH", "ARDS"])
SPELLED = Item("medqa_4options", "3", "", ["A", "B", "C", "D"], 2, "Which test?",
               ["Magnetic resonance imaging", "Electrocardiogram", "Computed tomography", "Lumbar puncture"])
EXPANSIONS = [  # 4. an abbreviated option named by its expansion (and an abbreviation naming a spelled-out option)
    (ABBREVIATED, "This is diabetic ketoacidosis.", B),
    (ABBREVIATED, "The most likely diagnosis is diabetic ketoacidosis given the anion gap.", B),
    (ABBREVIATED, "Findings fit the syndrome of inappropriate antidiuretic hormone secretion.", C),
    (ABBREVIATED, "The answer is acute respiratory distress syndrome.", D),
    (ABBREVIATED, "Hyperosmolar hyperglycemic state explains the osmolality of 380 without ketones.", A),
    (ABBREVIATED, "Final answer: diabetic ketoacidosis", B),
    (ABBREVIATED, "Diabetic ketoacidosis\n\nThe pH of 7.1 and the ketones settle it.", B),
    (ABBREVIATED, "It is not a hyperosmolar hyperglycemic state but diabetic ketoacidosis.", B),
    (ABBREVIATED, "Either diabetic ketoacidosis or acute respiratory distress syndrome.", None),  # two named
    (ABBREVIATED, "Dr. Kim agreed with the team.", None),  # no content words spell an option
    (ABBREVIATED, "Diabetes is known; the ketones are absent.", None),  # D…K…A words, but not a long form
    (SPELLED, "The answer is CT.", C),
    (SPELLED, "Get an ECG first.", B),
    (SPELLED, "An MRI shows it best.", A),
]


@pytest.mark.parametrize("reply, expected", CORRECTED)
def test_a_self_correction_voids_what_it_corrects(reply, expected):
    assert extract_answer(THOUGHT + reply, MCQ, thinking=True) == expected


@pytest.mark.parametrize("reply, expected", LONE_LINE)
def test_a_lone_choice_line_followed_by_explanation_is_an_answer(reply, expected):
    assert extract_answer(THOUGHT + reply, MCQ, thinking=True) == expected


@pytest.mark.parametrize("reply, expected", LANGUAGES)
def test_final_statements_in_other_languages(reply, expected):
    assert extract_answer(THOUGHT + reply, MCQ, thinking=True) == expected


@pytest.mark.parametrize("item, reply, expected", EXPANSIONS)
def test_an_abbreviated_option_is_named_by_its_expansion(item, reply, expected):
    assert extract_answer(THOUGHT + reply, item, thinking=True) == expected


@pytest.mark.parametrize("reply, path", [
    (r"\boxed{C}", "boxed"), ("The answer is C.", "final_statement"), ("C\n\nBecause.", "lone_choice_line"),
    ("C is correct.", "verdict"), ("C", "whole_reply"), ("No idea.", "unparsable"),
])
def test_the_parse_path_names_the_rule_that_decided(reply, path):
    from medadapt.eval.generative import read_reply

    assert read_reply(THOUGHT + reply, MCQ, thinking=True)[1] == path
    assert read_reply("<think>\nstill thinking", MCQ, thinking=True) == (None, "no_answer")


# ---- issue 27: the classes the re-probe still left unread -----------------------------------------------------
THYROID = Item("medqa_4options", "9", "", ["A", "B", "C", "D"], 1, "Most likely diagnosis?",
               ["Hypothyroidism", "Subclinical hypothyroidism", "Graves disease", "Thyroiditis"])
RECITED = "A. Warfarin\nB. Heparin infusion\nC. Aspirin\nD. Clopidogrel\n\n"

NESTED = [  # the reply names the longer of two nested option texts: the most specific match
    (THYROID, "The answer is subclinical hypothyroidism.", 1),
    (THYROID, "Final answer: Subclinical Hypothyroidism, given the normal T4.", 1),
    (THYROID, "La respuesta correcta es subclinical hypothyroidism.", 1),
    (THYROID, "The answer is hypothyroidism.", 0),  # the shorter one alone is still itself
    (THYROID, "Answer: hypothyroidism, not subclinical hypothyroidism.", None),  # both named apart: none
]
FIRST_PERSON = [
    (MCQ, "I'd go with (c).", C),
    (MCQ, "I'd pick B here.", B),
    (MCQ, "My pick is D.", D),
    (MCQ, "I'm going with C, aspirin.", C),
    (MCQ, "I'll go for option A.", A),
    (MCQ, "My choice would be C.", C),
    (MCQ, "Yo elegiría la C.", C),
    (MCQ, "Me decanto por la B.", B),
    (MCQ, "Je choisirais C.", C),
    (MCQ, "Mon choix : D.", D),
]
CONCLUSION = [  # the options recited one per line, then a conclusion word and a lone letter
    (MCQ, RECITED + "Therefore, C.", C),
    (MCQ, RECITED + "Hence: B", B),
    (MCQ, RECITED + "So, C.", C),
    (MCQ, RECITED + "Thus (C).", C),
    (MCQ, RECITED + "Por lo tanto, C.", C),
    (MCQ, RECITED + "Donc : B.", B),
    (MCQ, RECITED + "Also: C", C),
    (MCQ, RECITED + "So, C is wrong.", None),  # a rejection is not a pick
    (MCQ, RECITED + "Therefore, B or C.", None),
]
HEDGED = [
    (MCQ, "None fits perfectly; the closest is C.", C),
    (MCQ, "If I had to choose, B.", B),
    (MCQ, "C is the best fit here.", C),
    (MCQ, "The best match is D.", D),
    (MCQ, "C seems most likely.", C),
    (MCQ, "The most plausible option is A.", A),
    (MCQ, "Si tuviera que elegir, la B.", B),
    (MCQ, "La más probable es la C.", C),
    (MCQ, "Si je devais choisir, D.", D),
    (MCQ, "La plus probable est C.", C),
]
LATE_CORRECTION = [  # a self-correction whose new choice comes at the end of its sentence
    (MCQ, "The answer is C. Hmm, no — on reflection, given the bleeding risk, heparin is safer, so B.", B),
    (MCQ, "Final answer: D. Wait, no, thinking about onset times again, the first drug is aspirin, so C.", C),
    (MCQ, "The answer is A. Actually no, after rereading the question it has to be C.", C),
    (MCQ, "La respuesta es A. Espera, no: por la vía de administración, la correcta es la C.", C),
    (MCQ, "The answer is C. Hmm, no — on reflection, I am not sure.", None),  # retracted, nothing instead
]


@pytest.mark.parametrize("item, reply, expected", NESTED + FIRST_PERSON + CONCLUSION + HEDGED + LATE_CORRECTION)
def test_reads_the_classes_the_re_probe_left_unread(item, reply, expected):
    assert extract_answer(THOUGHT + reply, item, thinking=True) == expected
