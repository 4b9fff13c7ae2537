"""Classification tasks answered by likelihood over their closed answer sets (EvalConfig.closed_answers)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from data_fixtures import read_task, small_build

from recfound.data.templates import alpaca
from recfound.eval.closed import CONTENT_FREE, closed_answers, content_free
from recfound.eval.runner import answer
from recfound.eval.systems import GRMSystem
from recfound.model.backbone import BackboneConfig
from recfound.model.grm import GRM

CLASSIFICATION = (
    "sentiment_analysis",
    "product_relation_prediction",
    "product_matching",
    "sequential_recommendation",
    "candidate_ranking",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("closed")
    small_build(out)
    return out


@pytest.mark.parametrize("task", CLASSIFICATION)
def test_every_gold_answer_is_one_of_its_prompts_closed_answers(built: Path, task: str) -> None:
    """The contract with the builder: a closed set that missed the gold answer would make a task unwinnable."""
    rows = read_task(built, task, "train")
    assert rows
    for row in rows:
        answers = closed_answers(task, row["prompt"])
        assert answers is not None and row["response"] in answers and len(set(answers)) == len(answers) > 1


def test_free_text_tasks_have_no_closed_set(built: Path) -> None:
    [row] = read_task(built, "item_profile", "train")[:1]
    assert closed_answers("item_profile", row["prompt"]) is None


def test_closed_answers_are_the_likeliest_label_and_free_text_still_decodes(built: Path) -> None:
    system = GRMSystem("tiny", GRM.build(BackboneConfig()).eval(), batch_size=4)
    rows = pd.DataFrame(read_task(built, "sequential_recommendation", "test")[:5])
    prompts = rows["prompt"].tolist()
    picked = answer(system, "sequential_recommendation", prompts, 8, closed=True)
    letters = [closed_answers("sequential_recommendation", p) for p in prompts]
    scores = [
        system.model.choice_scores([p], list(options), "sequential_recommendation")[0]
        for p, options in zip(prompts, letters, strict=True)
    ]
    assert picked == [options[int(s.argmax())] for options, s in zip(letters, scores, strict=True)]
    assert answer(system, "sequential_recommendation", prompts, 3, closed=False) == system.generate(
        "sequential_recommendation", prompts, 3
    )


@pytest.mark.parametrize("task", CLASSIFICATION)
def test_a_content_free_twin_keeps_instruction_and_options_and_drops_the_input(built: Path, task: str) -> None:
    for row in read_task(built, task, "train")[:3]:
        prompt = row["prompt"]
        twin = content_free(prompt)
        assert twin.startswith(prompt.split("### Input:")[0] + "### Input:\n" + CONTENT_FREE + "\n\n### ")
        assert closed_answers(task, twin) == closed_answers(task, prompt)  # the options survive
        assert content_free(twin) == twin
    with pytest.raises(ValueError, match="Input"):
        content_free("Describe the kettle.")


class _Prior(GRMSystem):
    """Scores every answer by a fixed prior, plus 1 for the answer its input names: the prior decides uncalibrated
    (a majority-label model), the input decides calibrated."""

    PRIOR = {"positive": 5.0, "negative": 0.0, "neutral": 2.0}

    def __init__(self) -> None:
        pass

    def choice_scores(self, task: str, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        return np.array([[self.PRIOR[c] + (f"### Input:\n{c}" in p) for c in choices] for p in prompts])


def test_calibrated_choice_answers_from_the_input_not_the_prior() -> None:
    labels = ["negative", "neutral", "positive", "negative"]
    prompts = [alpaca("Rate it.", label) for label in labels]
    options = [("positive", "negative", "neutral")] * len(prompts)
    assert _Prior().choose("sentiment_analysis", prompts, options) == ["positive"] * 4
    assert _Prior().choose("sentiment_analysis", prompts, options, calibrate=True) == labels
