"""The question each benchmark puts to the model, in one place (the released models' prompt style).

Short-answer benchmarks end with the instruction their published evaluations use with LLaVA-style models,
grounding asks with the released models' `<|ref|>` phrase, multiple choice lists the options and asks for
the letter (VLMEvalKit's layout, without a judge model).
"""

from __future__ import annotations

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def short_answer(question: str) -> str:
    """ChartQA, DocVQA, InfoVQA, TextVQA."""
    return f"<image>\n{question.strip()}\n{SHORT_ANSWER}"


def open_question(question: str) -> str:
    """OCRBench: its questions already say what to answer."""
    return f"<image>\n{question.strip()}"


def grounding(expression: str) -> str:
    """RefCOCO family: the box of the referred object, in the released models' phrase."""
    return f"<image>\n<|ref|>{expression.strip()}<|/ref|>."


def multiple_choice(question: str, options: dict[str, str], hint: str = "") -> str:
    """VLMEvalKit TSV: optional hint, the question, one line per option, then the letter instruction."""
    lines = ["<image>"]
    if hint.strip():
        lines.append(f"Hint: {hint.strip()}")
    lines.append(f"Question: {question.strip()}")
    lines.append("Options:")
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    lines.append(CHOICE_INSTRUCTION)
    return "\n".join(lines)

