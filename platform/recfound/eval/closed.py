"""The closed answer set of each classification task, read off its prompt, for scoring answers by likelihood.

A classification prompt has a fixed set of valid answers (sentiment labels, relations, yes/no, the letters of
the listed options). Evaluated by free decoding, a small model that puts its probability mass on the right
label but phrases it loosely, or that ranks labels well but decodes the most frequent one, scores as wrong.
Scoring each valid answer's likelihood and taking the best (lm-eval-harness's multiple choice, and the
``guided_choice`` the Serve app offers for these tasks) measures what the model knows, for every system alike.
"""

from __future__ import annotations

import re

from recfound.data.templates import NO, RELATIONS, SENTIMENTS, YES

_FIXED: dict[str, tuple[str, ...]] = {
    "sentiment_analysis": SENTIMENTS,
    "product_relation_prediction": RELATIONS,
    "product_matching": (YES, NO),
    "answerability_prediction": (YES, NO),
    "candidate_ranking": (YES, NO),
}
_OPTIONS = re.compile(r"### Options:\n(.*?)\n\n### Response:", re.DOTALL)
_INPUT = re.compile(r"(### Input:\n)(.*?)(\n\n### (?:Options|Response):)", re.DOTALL)
CONTENT_FREE = "N/A"
"""The input of a calibration prompt (Zhao et al. 2021, "Calibrate before use"): says nothing about any answer."""
_LETTER = re.compile(r"^([A-Z]): ", re.MULTILINE)


def closed_answers(task: str, prompt: str) -> tuple[str, ...] | None:
    """The valid answers of ``prompt`` (a row of ``task``), or None for a free-text task. Sequential
    recommendation answers with the letter of one of the options the prompt lists."""
    if task in _FIXED:
        return _FIXED[task]
    if task == "sequential_recommendation" and (options := _OPTIONS.search(prompt)):
        return tuple(_LETTER.findall(options.group(1))) or None
    return None


def content_free(prompt: str) -> str:
    """``prompt`` with its input replaced by ``CONTENT_FREE``: same instruction and options, no evidence. How
    likely a model finds each answer here is its prior for that answer (a preferred label, a preferred letter),
    which calibrated scoring subtracts. ValueError when the prompt has no input section."""
    calibration, found = _INPUT.subn(lambda m: m.group(1) + CONTENT_FREE + m.group(3), prompt, count=1)
    if not found:
        raise ValueError("not an instruction prompt with an '### Input:' section")
    return calibration
