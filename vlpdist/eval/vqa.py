"""VQA accuracy by the rules of the official VQAv2 evaluation (GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`), and the most-common-answer baseline.

Normalisation (`normalize_answer`), in the official order:
1. line breaks and tabs become spaces, the ends are stripped;
2. punctuation (`PUNCTUATION`; not the apostrophe, colon or period): when the text holds a
   digit-comma-digit ("1,000") every such mark is deleted; otherwise a mark that touches a space
   anywhere in the text is deleted everywhere, and one that never does becomes a space ("yes/no"
   -> "yes no", "yes / no" -> "yes  no"); then a period is deleted unless a digit follows it
   ("two." -> "two", "2.5" kept);
3. lower case, split on whitespace, number words to digits ("none" and "zero" -> "0" ... "ten"
   -> "10"), the articles a/an/the dropped, then the contractions table ("dont" -> "don't").

Accuracy of one answer: a human's answer counts as the truth for the others, so for each of the n
humans the prediction scores min(1, #other humans who gave it / 3), and the question scores the
mean over the n leave-one-out subsets (10 of 9 answers for VQAv2's 10). Reported x100, overall and
per answer type, each with its question count.

Where this differs from the official script, and why: the official script normalises the human
answers only when they disagree, and then only their punctuation, because VQAv2's annotation file
holds answers that were already normalised; vlpdist's answers come from any URL list (and the demo
world writes "two" beside "2"), so they get the full normalisation, always. On pre-normalised
answers this is the same comparison (normalising them again changes nothing). The official
period rule also stops after 32 periods (`re.UNICODE` passed as `sub`'s count); here every one goes.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official table, as "written=normalised" pairs. Its capitalised entries (Im, Ive, Id've, I'dve)
# never match, since the words are lower-cased first, and "somebody'd" maps the other way round;
# both kept, so answers normalise exactly as the official script has them.
CONTRACTIONS = dict(pair.split("=") for pair in """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
    hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
    howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
    itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
    mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
    neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
    'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
    shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
    somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
    someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
    someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd
    thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
    theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
    wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
    whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
    whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
    whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a lookahead (not a lookbehind)
# for "<=" and a digit, which never matches where a period stands, so only "no digit follows" acts.
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
HUMANS_FOR_FULL_CREDIT = 3
NO_ANSWER_TYPE = "(no type)"
"""The per-type row of questions whose row gave no answer type (so the rows add up to the total)."""


def strip_punctuation(text: str) -> str:
    """Step 2 of `normalize_answer`: the official punctuation and period rules."""
    delete_all = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test reads the text as given, not as earlier marks left it (as the official one does).
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_words(text: str) -> str:
    """Step 3 of `normalize_answer`: lower case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer (predicted or human) as the official VQA evaluation compares it (module docstring)."""
    return normalize_words(strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def answer_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction in [0, 1]: over the n leave-one-out subsets of the n
    human answers, the mean of min(1, matches among the other n-1 / 3), after normalisation."""
    if not answers:
        raise ValueError("a question without human answers cannot be scored")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    given = sum(matches)
    # Leaving out a human who gave the prediction leaves given-1 matches among the others; anyone else, given.
    per_subset = [min(1.0, (given - left_out) / HUMANS_FOR_FULL_CREDIT) for left_out in matches]
    return math.fsum(per_subset) / len(per_subset)


def score_vqa(predictions: Sequence[str], answers: Sequence[Sequence[str]], answer_types: Sequence[str]) -> dict:
    """VQA accuracy x100 of `predictions` against each question's human answers: {"questions",
    "accuracy", "per_answer_type": {type: {"questions", "accuracy"}}} (types in first-seen order;
    an empty type counts under `NO_ANSWER_TYPE`). Sums are exact (`math.fsum`), so the numbers do
    not depend on the order the questions come in."""
    if not len(predictions) == len(answers) == len(answer_types):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answer lists and {len(answer_types)} answer types")
    if not predictions:
        raise ValueError("no questions to score")
    accuracies = [answer_accuracy(prediction, human) for prediction, human in zip(predictions, answers)]
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for accuracy, answer_type in zip(accuracies, answer_types):
        by_type[answer_type or NO_ANSWER_TYPE].append(accuracy)
    percent = lambda values: 100.0 * math.fsum(values) / len(values)  # noqa: E731
    return {
        "questions": len(accuracies),
        "accuracy": percent(accuracies),
        "per_answer_type": {kind: {"questions": len(values), "accuracy": percent(values)} for kind, values in by_type.items()},
    }


def most_common_answers(question_types: Iterable[str], answers: Iterable[Sequence[str]]) -> dict:
    """The prior baseline's table from training questions: per question type the most common
    normalised human answer (every human's answer counts; ties go to the first seen), and the most
    common one overall for question types training never saw. {"by_question_type", "overall"}."""
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall: collections.Counter = collections.Counter()
    for question_type, human in zip(question_types, answers):
        normalised = [normalize_answer(answer) for answer in human]
        by_type[question_type].update(normalised)
        overall.update(normalised)
    if not overall:
        raise ValueError("the most-common-answer baseline needs at least one training question with answers")
    return {"by_question_type": {kind: counts.most_common(1)[0][0] for kind, counts in by_type.items()},
            "overall": overall.most_common(1)[0][0]}


def baseline_answers(table: dict, question_types: Sequence[str]) -> list[str]:
    """The prior baseline's prediction for each question: its type's most common training answer
    (`most_common_answers`), or the overall one for a type training never saw."""
    return [table["by_question_type"].get(kind, table["overall"]) for kind in question_types]


def format_vqa_rows(vqa: dict) -> list[tuple[str, str, str]]:
    """(measure, ours, against the baselines) rows of a `vqa` result (end of training or
    `launcher.evaluate --vqa`): overall, then per answer type, x100 with question counts."""
    systems = [("LM without the image", vqa.get("lm_without_image")),
               ("most common answer per question type", vqa.get("most_common_answer"))]
    systems = [(name, scored) for name, scored in systems if scored is not None]
    rows = []
    ours = vqa["accuracy"]
    kinds = [(f"VQA accuracy ({ours['questions']} questions, x100)", None)]
    kinds += [(f"VQA accuracy: {kind} ({row['questions']})", kind) for kind, row in ours["per_answer_type"].items()]
    for label, kind in kinds:
        pick = (lambda scored: scored["accuracy"]) if kind is None else (lambda scored: scored["per_answer_type"][kind]["accuracy"])  # noqa: E731
        against = "; ".join(f"{name} {pick(scored):.2f}" for name, scored in systems)
        rows.append((label, f"{pick(ours):.2f}", against))
    return rows
