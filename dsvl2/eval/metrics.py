"""Evaluation metrics as the benchmarks publish them.

- VQAv2 answer normalisation, exact match and the leave-one-out soft score.
- ANLS (DocVQA / InfoVQA, the paper's NL < 0.5), relaxed accuracy (ChartQA, pix2struct's `relaxed_correctness`),
  box IoU and grounding accuracy (RefCOCO), OCRBench's containment rule, multiple-choice letters (VLMEvalKit
  TSV files, no judge model), character error rate and exact match for OCR, token F1 for captions.
- `METRICS` / `score_sample` map a task name to a scorer over (prediction, record), where a record is an
  eval JSONL record carrying `answers` (and `box` / `boxes` on the 0..999 grid for grounding tasks).
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from rapidfuzz.distance import Levenshtein

from dsvl2.errors import InputError
from dsvl2.grounding import parse_grounding

Box = Sequence[float]
HIT_IOU = 0.5  # a box is right when its IoU with the truth is at least this (RefCOCO Acc@0.5)

# --------------------------------------------------------------------------------------------------
# VQAv2 answer normalisation
# --------------------------------------------------------------------------------------------------

# Keys are the apostrophe-less spellings annotators type; values the canonical form. The official table
# also lists capitalised keys ("Im", "Ive", "Id've") that can never fire because words are lower-cased
# first, so they are left out here: the effect is the same.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd": "somebody'd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is written "(?!<=\d)(\.)(?!\d)"; its first group is a look-ahead (not the intended
# look-behind) and always holds, so in effect a period is removed unless a digit follows it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    # A digit-comma-digit anywhere (e.g. "1,000") makes every punctuation mark vanish instead of becoming
    # a space, so thousands separators join their digits.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """VQAv2 evaluation normalisation: punctuation, lower case, number words, articles, contractions."""
    if not isinstance(answer, str):
        raise InputError(f"answer must be a string, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise InputError(f"answers must be a list of strings, got {type(answers).__name__}")
    if not answers:
        raise InputError("answers is empty: at least one reference answer is needed")
    for answer in answers:
        if not isinstance(answer, str):
            raise InputError(f"every answer must be a string, got {type(answer).__name__}")
    return list(answers)


def vqa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    references = {normalize_answer(a) for a in _check_answers(answers)}
    return 1.0 if normalize_answer(prediction) in references else 0.0


def vqa_soft_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: min(1, matches / 3) averaged over the subsets leaving out one reference answer each,
    for any number of answers (the official evaluation's rule)."""
    references = [normalize_answer(a) for a in _check_answers(answers)]
    predicted = normalize_answer(prediction)
    matches = sum(1 for ref in references if ref == predicted)
    total = 0.0
    for ref in references:
        matches_among_others = matches - (1 if ref == predicted else 0)
        total += min(1.0, matches_among_others / 3)
    return total / len(references)


# --------------------------------------------------------------------------------------------------
# Edit distance, ANLS, CER
# --------------------------------------------------------------------------------------------------


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Minimum number of single-element insertions, deletions and substitutions turning a into b."""
    return Levenshtein.distance(a, b)


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction: max over answers of 1 - NL,
    where NL = edit distance / max(len) on lower-cased, whitespace-normalised strings, and NL >= threshold
    scores 0."""
    if not isinstance(prediction, str):
        raise InputError(f"prediction must be a string, got {type(prediction).__name__}")
    predicted = _anls_text(prediction)
    best = 0.0
    for answer in _check_answers(answers):
        reference = _anls_text(answer)
        longest = max(len(predicted), len(reference))
        distance = levenshtein(predicted, reference) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def character_error_rate(prediction: str, reference: str) -> float:
    """Character edit distance / len(reference). An empty reference gives 0.0 for an empty prediction and
    1.0 otherwise (the ratio is undefined there). The value may exceed 1 for long wrong predictions."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise InputError("prediction and reference must be strings")
    if not reference:
        return 0.0 if not prediction else 1.0
    return levenshtein(prediction, reference) / len(reference)


def _whitespace_normalised(text: str) -> str:
    return " ".join(text.split())


def ocr_exact_match(prediction: str, reference: str, ignore_case: bool = False) -> float:
    """1.0 when the texts agree after collapsing whitespace (line breaks count as spaces)."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise InputError("prediction and reference must be strings")
    predicted, expected = _whitespace_normalised(prediction), _whitespace_normalised(reference)
    if ignore_case:
        predicted, expected = predicted.lower(), expected.lower()
    return 1.0 if predicted == expected else 0.0


# --------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# --------------------------------------------------------------------------------------------------

def _chart_float(text: str) -> float | None:
    # pix2struct's _to_float: what float() parses is a number, a trailing "%" divides it by 100.
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy exactly as pix2struct's `relaxed_correctness` (which lmms-eval copies): when
    both parse as numbers and the target is non-zero, a relative error of at most `tolerance` scores 1;
    otherwise the strings must be equal ignoring case (nothing is stripped)."""
    if not isinstance(prediction, str) or not isinstance(target, str):
        raise InputError("prediction and target must be strings")
    predicted, expected = _chart_float(prediction), _chart_float(target)
    if predicted is not None and expected:
        return 1.0 if abs(predicted - expected) / abs(expected) <= tolerance else 0.0
    return 1.0 if prediction.lower() == target.lower() else 0.0


# --------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------


def _as_box(box: Any) -> list[float] | None:
    """The four coordinates as floats (Python or NumPy numbers, lists or arrays), None when malformed."""
    if hasattr(box, "tolist"):
        box = box.tolist()
    if box is None or isinstance(box, str) or not isinstance(box, Sequence) or len(box) != 4:
        return None
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return None
    values = [float(v) for v in box]
    return values if values[2] > values[0] and values[3] > values[1] else None


def _is_valid_box(box: Any) -> bool:
    return _as_box(box) is not None


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (continuous coordinates, x2 > x1, y2 > y1).

    A malformed or empty box has no area and scores 0.0.
    """
    a, b = _as_box(a), _as_box(b)
    if a is None or b is None:
        return 0.0
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    intersection = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union


def grounding_accuracy(
    pred_boxes: Sequence[Box | None], gt_boxes: Sequence[Box], threshold: float = HIT_IOU
) -> float:
    """Fraction of predictions with IoU >= threshold against their ground truth (RefCOCO Acc@0.5).

    A missing (None) or malformed prediction counts as wrong.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise InputError(f"{len(pred_boxes)} predicted boxes for {len(gt_boxes)} ground-truth boxes")
    if len(gt_boxes) == 0:
        raise InputError("no ground-truth boxes to score")
    hits = sum(1 for pred, gt in zip(pred_boxes, gt_boxes, strict=True) if box_iou(pred, gt) >= threshold)
    return hits / len(gt_boxes)


def parse_det_boxes(text: str) -> list[list[int]]:
    """Every grid box inside the `<|det|>` spans of a model answer, in order (regex parsing, never eval).

    Malformed spans are skipped: for scoring they are simply missing predictions.
    """
    if not isinstance(text, str):
        raise InputError(f"prediction must be a string, got {type(text).__name__}")
    return [list(box) for ref in parse_grounding(text).refs for box in ref.boxes]


# --------------------------------------------------------------------------------------------------
# OCRBench, multiple choice
# --------------------------------------------------------------------------------------------------

OCRBENCH_FORMULA_DATASET = "HME100k"  # OCRBench compares handwritten formulas with every space removed


def ocrbench_match(prediction: str, answers: Sequence[str], dataset_name: str = "") -> float:
    """OCRBench's rule: 1.0 when any reference answer occurs inside the prediction, both lower-cased and
    stripped with line breaks as spaces; for HME100k formulas case is kept and all spaces are removed."""
    if not isinstance(prediction, str):
        raise InputError(f"prediction must be a string, got {type(prediction).__name__}")
    for answer in _check_answers(answers):
        if dataset_name == OCRBENCH_FORMULA_DATASET:
            reference = answer.strip().replace("\n", " ").replace(" ", "")
            predicted = prediction.strip().replace("\n", " ").replace(" ", "")
        else:
            reference = answer.lower().strip().replace("\n", " ")
            predicted = prediction.lower().strip().replace("\n", " ")
        if reference in predicted:
            return 1.0
    return 0.0


_CHOICE_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, read without a judge model (VLMEvalKit's `can_infer`).

    First a letter: exactly one option letter standing alone once `.()[],:;!*#{}` become spaces ("B",
    "(B)", "Answer: B."); else the text of exactly one option inside the lower-cased answer. None when the
    answer names no option, or several.
    """
    if not isinstance(prediction, str):
        raise InputError(f"prediction must be a string, got {type(prediction).__name__}")
    words = set(prediction.translate(_CHOICE_SEPARATORS).split())
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    lowered = prediction.lower()
    by_text = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


# --------------------------------------------------------------------------------------------------
# Token F1 (captions)
# --------------------------------------------------------------------------------------------------


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over VQA-normalised words (SQuAD-style F1)."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
        return 1.0 if predicted == expected else 0.0
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

SampleScorer = Callable[[str, dict], dict]


def _record_answers(record: dict) -> list[str]:
    if "answers" not in record:
        raise InputError("record has no 'answers' field to score against")
    return _check_answers(record["answers"])


def _record_box(record: dict, key: str = "box") -> list[float]:
    box = record.get(key)
    if not _is_valid_box(box):
        raise InputError(f"record field '{key}' must be four finite numbers [x1, y1, x2, y2] with x2 > x1 and "
                         "y2 > y1")
    return _as_box(box)


def _score_vqa(prediction: str, record: dict) -> dict:
    answers = _record_answers(record)
    soft = vqa_soft_score(prediction, answers)
    return {"score": soft, "vqa_score": soft, "exact_match": vqa_exact_match(prediction, answers)}


def _score_exact(prediction: str, record: dict) -> dict:
    exact = vqa_exact_match(prediction, _record_answers(record))
    return {"score": exact, "exact_match": exact}


def _score_anls(prediction: str, record: dict) -> dict:
    value = anls(prediction, _record_answers(record))
    return {"score": value, "anls": value}


def _score_chart(prediction: str, record: dict) -> dict:
    # The model's answer loses its surrounding whitespace (the generation's, not an answer's); the target
    # is compared as published.
    value = max(relaxed_accuracy(prediction.strip(), answer) for answer in _record_answers(record))
    return {"score": value, "relaxed_accuracy": value}


def _score_grounding(prediction: str, record: dict) -> dict:
    target = _record_box(record)
    predicted = parse_det_boxes(prediction)
    iou = box_iou(predicted[0], target) if predicted else 0.0
    accuracy = 1.0 if iou >= HIT_IOU else 0.0
    return {"score": accuracy, "accuracy": accuracy, "iou": iou, "parsed": bool(predicted)}


def _score_grounded_caption(prediction: str, record: dict) -> dict:
    targets = record.get("boxes")
    if not isinstance(targets, list) or not targets:
        raise InputError("record field 'boxes' must be a non-empty list of [x1, y1, x2, y2] boxes")
    predicted = parse_det_boxes(prediction)
    padded = list(predicted[: len(targets)]) + [None] * max(0, len(targets) - len(predicted))
    accuracy = grounding_accuracy(padded, targets)
    exact_count = 1.0 if len(predicted) == len(targets) else 0.0
    return {"score": accuracy, "accuracy": accuracy, "box_count_match": exact_count}


def _score_ocr(prediction: str, record: dict) -> dict:
    answers = _record_answers(record)
    exact = max(ocr_exact_match(prediction, answer) for answer in answers)
    cer = min(character_error_rate(_whitespace_normalised(prediction), _whitespace_normalised(answer))
              for answer in answers)
    return {"score": exact, "exact_match": exact, "cer": cer}


def _score_ocrbench(prediction: str, record: dict) -> dict:
    value = ocrbench_match(prediction, _record_answers(record), str(record.get("dataset_name", "")))
    return {"score": value, "accuracy": value}


def _score_choice(prediction: str, record: dict) -> dict:
    options = record.get("options")
    if not isinstance(options, dict) or not options:
        raise InputError("record has no 'options' to choose from")
    answer = record.get("answer")
    if answer not in options:
        raise InputError(f"record's answer names no option (options are {', '.join(options)})")
    chosen = extract_choice(prediction, options)
    correct = 1.0 if chosen == answer else 0.0
    return {"score": correct, "accuracy": correct, "no_option": 1.0 if chosen is None else 0.0}


def _score_caption(prediction: str, record: dict) -> dict:
    answers = _record_answers(record)
    f1 = max(token_f1(prediction, answer) for answer in answers)
    return {"score": f1, "token_f1": f1, "exact_match": vqa_exact_match(prediction, answers)}


METRICS: dict[str, SampleScorer] = {
    "vqa": _score_vqa,
    "counting": _score_exact,
    "text": _score_exact,
    "anls": _score_anls,
    "chart": _score_chart,
    "grounding": _score_grounding,
    "grounded_caption": _score_grounded_caption,
    "ocr": _score_ocr,
    "caption": _score_caption,
    "ocrbench": _score_ocrbench,
    "choice": _score_choice,
}


def score_sample(task: str, prediction: str, record: dict) -> dict:
    """Score one model answer for an eval record; the result always has a primary "score" in [0, 1]."""
    scorer = METRICS.get(task)
    if scorer is None:
        raise InputError(f"unknown metric task {task!r}; known: {', '.join(sorted(METRICS))}")
    if not isinstance(prediction, str):
        raise InputError(f"prediction must be a string, got {type(prediction).__name__}")
    if not isinstance(record, dict):
        raise InputError(f"record must be a dict, got {type(record).__name__}")
    return scorer(prediction, record)
