"""Metrics against hand-computed values (each expected number is derived in the test or its comment)."""

from __future__ import annotations

import pytest

from dsvl2.errors import InputError
from dsvl2.eval.metrics import (
    METRICS,
    anls,
    box_iou,
    character_error_rate,
    extract_choice,
    grounding_accuracy,
    levenshtein,
    normalize_answer,
    ocr_exact_match,
    ocrbench_match,
    parse_det_boxes,
    relaxed_accuracy,
    score_sample,
    token_f1,
    vqa_exact_match,
    vqa_soft_score,
)

# ---------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("black-white", "black white"),  # mark not next to a space becomes a space
        ("yes, it is", "yes it is"),  # mark next to a space is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont", "don't"),
        ("  Ten\tdogs\n", "10 dogs"),
        ("none", "0"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_rejects_non_string() -> None:
    with pytest.raises(InputError, match="string"):
        normalize_answer(3)  # type: ignore[arg-type]


def test_vqa_exact_match_uses_normalisation() -> None:
    assert vqa_exact_match("Two", ["2"]) == 1.0
    assert vqa_exact_match("the dog.", ["cat", "dog"]) == 1.0
    assert vqa_exact_match("dogs", ["dog"]) == 0.0


def test_vqa_exact_match_rejects_empty_answers() -> None:
    with pytest.raises(InputError, match="empty"):
        vqa_exact_match("x", [])
    with pytest.raises(InputError, match="list"):
        vqa_exact_match("x", "x")  # type: ignore[arg-type]


def test_vqa_soft_score_two_of_ten() -> None:
    # Leave-one-out over 10 annotators, 2 of whom said "2":
    #   leaving out one of the 2 matching answers (2 subsets): 1 match  -> min(1, 1/3) = 1/3
    #   leaving out one of the 8 others          (8 subsets): 2 matches -> min(1, 2/3) = 2/3
    #   mean = (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    answers = ["2", "two"] + ["3"] * 8
    assert vqa_soft_score("Two", answers) == pytest.approx(0.6, abs=1e-12)


def test_vqa_soft_score_three_and_four_of_ten() -> None:
    # 3 matches: 3 subsets keep 2 matches (2/3), 7 subsets keep 3 (1) -> (2 + 7) / 10 = 0.9
    assert vqa_soft_score("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9, abs=1e-12)
    # 4 matches: every subset keeps >= 3 matches -> 1.0
    assert vqa_soft_score("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert vqa_soft_score("maybe", ["yes"] * 4 + ["no"] * 6) == 0.0


def test_vqa_soft_score_fewer_than_ten_answers_is_the_leave_one_out_average() -> None:
    # The case: leaving out "2" keeps 3 matches (1), leaving out a "no" keeps 2 (2/3, three times)
    # -> (1 + 3 * 2/3) / 4 = 0.75 (min(1, matches / 3) would say 1.0).
    assert vqa_soft_score("no", ["2", "no", "no", "no"]) == pytest.approx(0.75, abs=1e-12)
    assert vqa_soft_score("cat", ["cat"]) == 0.0  # the only subset leaves the one match out
    # four matches: every subset keeps 3 -> 1.0
    assert vqa_soft_score("cat", ["cat", "Cat", "a cat", "the cat", "dog"]) == 1.0
    # two matches of three: out "cat" -> 1/3 (twice), out "dog" -> 2/3 -> (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_soft_score("cat", ["cat", "cat.", "dog"]) == pytest.approx(4 / 9, abs=1e-12)


# ---------------------------------------------------------------- edit distance, ANLS, CER


def test_levenshtein_known_values() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_threshold_edge_exactly_half_scores_zero() -> None:
    # "ab" vs "ac": 1 edit / max length 2 = 0.5, which is not below the 0.5 threshold.
    assert anls("ab", ["ac"]) == 0.0


def test_anls_just_below_threshold_scores() -> None:
    # 101 characters with 50 substituted: NL = 50 / 101 < 0.5 -> 1 - 50/101 = 51/101
    reference = "a" * 101
    prediction = "b" * 50 + "a" * 51
    assert anls(prediction, [reference]) == pytest.approx(51 / 101)
    # "abc" vs "abd": NL = 1/3 -> 2/3
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)


def test_anls_case_whitespace_and_max_over_answers() -> None:
    assert anls("  Hello   World ", ["hello world"]) == 1.0
    # best answer: "abd" (2/3) beats "xyz" (NL = 1 -> 0)
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)
    assert anls("", [""]) == 1.0


def test_character_error_rate() -> None:
    assert character_error_rate("sitting", "kitten") == pytest.approx(3 / 6)
    assert character_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    assert character_error_rate("abc", "abc") == 0.0
    assert character_error_rate("", "") == 0.0
    assert character_error_rate("x", "") == 1.0


def test_ocr_exact_match() -> None:
    assert ocr_exact_match("HELLO\n42", "HELLO 42") == 1.0
    assert ocr_exact_match("hello 42", "HELLO 42") == 0.0
    assert ocr_exact_match("hello 42", "HELLO 42", ignore_case=True) == 1.0


# ---------------------------------------------------------------- ChartQA relaxed accuracy


# pix2struct's relaxed_correctness: float() parses, a trailing % divides by 100, a non-zero target for the
# 5 % test, otherwise case-insensitive equality of the unstripped strings.
@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("105", "100", 1.0),  # exactly 5 %: 5 / 100 = 0.05 in floats too
        ("95", "100", 1.0),
        ("105.1", "100", 0.0),  # just over 5 %
        ("1.05", "1.0", 0.0),  # the case: 1.05 - 1.0 = 0.050000000000000044 > 0.05
        ("0", "0", 1.0),  # zero target: the strings must be equal
        ("0.0", "0", 0.0),  # the case: "0.0" != "0"
        ("-0", "0", 0.0),  # the case
        ("0.01", "0", 0.0),
        ("45%", "45%", 1.0),
        ("45%", "0.45", 1.0),  # 45 % read as 0.45
        ("45%", "45", 0.0),  # the case: 0.45 against 45
        ("47%", "45%", 1.0),  # |0.47 - 0.45| / 0.45 = 4.4 %
        ("48%", "45%", 0.0),  # 6.7 %
        ("-5.2", "-5", 1.0),  # 4 %
        ("-5.3", "-5", 0.0),  # 6 %
        ("5", "-5", 0.0),
        ("1,234", "1234", 0.0),  # the case: float() does not read thousands separators
        ("1_000", "1000", 1.0),  # the case: float() reads underscores
        ("1e3", "1000", 1.0),
        (" 100", "100", 1.0),  # float() ignores surrounding whitespace
        ("Brazil", "brazil ", 0.0),  # the case: nothing is stripped
        ("nan", "nan", 0.0),  # the case: NaN is a number and never within 5 %
        ("Apple", "apple", 1.0),  # non-numeric: case-insensitive exact
        ("apple", "apples", 0.0),
        ("abc", "100", 0.0),
    ],
)
def test_relaxed_accuracy(prediction: str, target: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, target) == expected


# ---------------------------------------------------------------- boxes


def test_box_iou() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    # half of each box overlaps: intersection 5 x 10 = 50, union 100 + 100 - 50 = 150
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    # containment: 100 / 200
    assert box_iou([0, 0, 10, 10], [0, 0, 20, 10]) == 0.5
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # inverted box is invalid
    assert box_iou([0, 0, 10], [0, 0, 10, 10]) == 0.0  # type: ignore[list-item]


def test_boxes_as_numpy_are_read_like_lists() -> None:
    import numpy as np

    # half of each box overlaps -> 1/3, whatever holds the numbers
    expected = box_iou([0, 0, 10, 10], [5, 0, 15, 10])
    assert box_iou(np.array([0, 0, 10, 10]), np.array([5.0, 0, 15, 10], dtype=np.float32)) == expected
    assert box_iou([np.int64(0), np.int64(0), np.int64(10), np.int64(10)], [np.float32(5), 0, 15, 10]) == expected
    assert grounding_accuracy(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]])) == 1.0
    assert box_iou([0, 0, True, 10], [0, 0, 10, 10]) == 0.0  # a bool is not a coordinate


def test_levenshtein_is_fast_on_long_strings() -> None:
    import time

    started = time.perf_counter()
    assert levenshtein("ab" * 500, "ba" * 500) == 2  # a shift by one: delete the first, append the last
    assert time.perf_counter() - started < 0.05  # the pure-Python loop took 0.22 s


def test_grounding_accuracy() -> None:
    gt = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    predictions = [
        [0, 0, 20, 10],  # IoU exactly 0.5 -> correct
        None,  # no prediction -> wrong
        [5, 0, 15, 10],  # IoU 1/3 -> wrong
        [10, 10, 0, 0],  # invalid -> wrong
    ]
    assert grounding_accuracy(predictions, gt) == 0.25
    with pytest.raises(InputError, match="predicted boxes"):
        grounding_accuracy([None], gt)


def test_parse_det_boxes() -> None:
    text = "<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> and <|det|>[[5,6,7,8],[9, 10, 11, 12]]<|/det|>"
    assert parse_det_boxes(text) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert parse_det_boxes("no boxes [[1, 2, 3, 4]] outside det tags") == []
    assert parse_det_boxes("<|det|>[[__import__('os')]]<|/det|>") == []


# ---------------------------------------------------------------- token F1 and registry


def test_token_f1() -> None:
    # "red circle" vs "red square": overlap 1, precision 1/2, recall 1/2 -> F1 1/2
    assert token_f1("a red circle", "the red square") == pytest.approx(0.5)
    assert token_f1("Red circle.", "red circle") == 1.0
    assert token_f1("blue", "red") == 0.0


def test_registry_covers_tasks() -> None:
    for task in ("vqa", "counting", "anls", "chart", "grounding", "ocr", "caption"):
        assert task in METRICS


def test_score_sample_grounding() -> None:
    record = {"box": [100, 200, 300, 400], "answers": ["ignored"]}
    exact = "<|ref|>the red circle<|/ref|><|det|>[[100, 200, 300, 400]]<|/det|>"
    result = score_sample("grounding", exact, record)
    assert result["score"] == 1.0 and result["iou"] == 1.0
    # shifted by 100 in x: intersection 100 x 200, union 2 * 200 x 200 - 100 x 200 -> 1/3
    shifted = "<|det|>[[200, 200, 400, 400]]<|/det|>"
    result = score_sample("grounding", shifted, record)
    assert result["score"] == 0.0 and result["iou"] == pytest.approx(1 / 3)
    assert score_sample("grounding", "I cannot see it", record)["score"] == 0.0


def test_score_sample_grounding_hit_at_exactly_half_iou() -> None:
    # the prediction holds the truth and is twice as wide: intersection 200 x 200, union 400 x 200 -> IoU 0.5
    record = {"box": [100, 200, 300, 400], "answers": ["ignored"]}
    result = score_sample("grounding", "<|det|>[[100, 200, 500, 400]]<|/det|>", record)
    assert result["iou"] == 0.5 and result["score"] == 1.0
    grounded = score_sample("grounded_caption", "<|det|>[[100, 200, 500, 400]]<|/det|>",
                            {"boxes": [[100, 200, 300, 400]], "answers": ["x"]})
    assert grounded["score"] == 1.0


def test_score_sample_grounding_needs_a_valid_box() -> None:
    with pytest.raises(InputError, match="box"):
        score_sample("grounding", "<|det|>[[1, 2, 3, 4]]<|/det|>", {"answers": ["x"]})


def test_score_sample_grounded_caption() -> None:
    record = {"boxes": [[0, 0, 100, 100], [500, 500, 600, 600]], "answers": ["x"]}
    one_right = "<|ref|>a<|/ref|><|det|>[[0, 0, 100, 100]]<|/det|>"
    result = score_sample("grounded_caption", one_right, record)
    assert result["score"] == 0.5 and result["box_count_match"] == 0.0


def test_score_sample_other_tasks() -> None:
    assert score_sample("vqa", "Two", {"answers": ["2"] * 4})["score"] == 1.0
    assert score_sample("vqa", "Two", {"answers": ["2"] * 3})["score"] == pytest.approx(2 / 3)  # 2 of 2 left
    assert score_sample("counting", "three", {"answers": ["3"]})["score"] == 1.0
    assert score_sample("counting", "4", {"answers": ["3"]})["score"] == 0.0
    assert score_sample("anls", "abc", {"answers": ["abd"]})["score"] == pytest.approx(2 / 3)
    assert score_sample("chart", "104", {"answers": ["100"]})["score"] == 1.0
    ocr = score_sample("ocr", "HELLO 4", {"answers": ["HELLO 42"]})
    assert ocr["score"] == 0.0 and ocr["cer"] == pytest.approx(1 / 8)
    assert score_sample("caption", "a red circle", {"answers": ["the red square"]})["score"] == 0.5


def test_ocrbench_rule_is_containment() -> None:
    # OCRBench: an answer inside the lower-cased, stripped prediction scores; line breaks count as spaces.
    assert ocrbench_match("The sign says STOP here", ["stop"]) == 1.0
    assert ocrbench_match("Hello\nworld", ["hello world"]) == 1.0
    assert ocrbench_match("sto", ["stop"]) == 0.0
    assert ocrbench_match("no", ["yes", "no"]) == 1.0
    # HME100k formulas: case kept, every space removed
    assert ocrbench_match("x ^ { 2 } + 1", ["x^{2}+1"], "HME100k") == 1.0
    assert ocrbench_match("X^{2}+1", ["x^{2}+1"], "HME100k") == 0.0
    assert ocrbench_match("X^{2}+1", ["x^{2}+1"], "IIIT5K") == 1.0
    assert score_sample("ocrbench", "It reads 42.", {"answers": ["42"], "dataset_name": "IIIT5K"})["score"] == 1.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is B.", "B"),
        ("Answer: D", "D"),
        ("a dog", "B"),  # no letter: the one option whose text is in the answer
        ("A cat", "A"),  # "A" stands alone, as in VLMEvalKit
        ("b", None),  # letters are capitals, and "b" holds no option's text
        ("B or C", None),  # two letters, and no option text: none
        ("I cannot tell", None),
        ("cat or dog", None),  # two option texts
    ],
)
def test_extract_choice(prediction: str, expected: str | None) -> None:
    options = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert extract_choice(prediction, options) == expected


def test_score_sample_choice_counts_answers_naming_no_option() -> None:
    record = {"options": {"A": "cat", "B": "dog"}, "answer": "B"}
    assert score_sample("choice", "B.", record) == {"score": 1.0, "accuracy": 1.0, "no_option": 0.0}
    assert score_sample("choice", "A", record)["score"] == 0.0
    assert score_sample("choice", "a horse", record) == {"score": 0.0, "accuracy": 0.0, "no_option": 1.0}
    with pytest.raises(InputError, match="names no option"):
        score_sample("choice", "A", {"options": {"A": "cat"}, "answer": "E"})


def test_score_sample_ocr_takes_the_closest_reference() -> None:
    # "HELLO 4" is 1 edit from "HELLO 42" (CER 1/8) and 6 from "HI" (CER 3): the best reference counts,
    # whichever order the references come in.
    for answers in (["HELLO 42", "HI"], ["HI", "HELLO 42"]):
        ocr = score_sample("ocr", "HELLO 4", {"answers": answers})
        assert ocr["cer"] == pytest.approx(1 / 8) and ocr["exact_match"] == 0.0
    assert score_sample("ocr", "HI", {"answers": ["HELLO 42", "HI"]})["exact_match"] == 1.0


def test_score_sample_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="unknown metric task"):
        score_sample("nope", "x", {"answers": ["x"]})
    with pytest.raises(InputError, match="answers"):
        score_sample("vqa", "x", {})
    with pytest.raises(InputError, match="prediction"):
        score_sample("vqa", None, {"answers": ["x"]})  # type: ignore[arg-type]
