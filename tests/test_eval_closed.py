"""Classification tasks answered by likelihood over their closed answer sets (EvalConfig.closed_answers)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from data_fixtures import read_task, small_build
from recfound.eval.closed import closed_answers
from recfound.eval.runner import answer
from recfound.eval.systems import GRMSystem
from recfound.model.backbone import BackboneConfig
from recfound.model.grm import GRM

CLASSIFICATION = ("sentiment_analysis", "product_relation_prediction", "product_matching", "sequential_recommendation",
                  "candidate_ranking")


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
    scores = [system.model.choice_scores([p], list(options), "sequential_recommendation")[0] for p, options in
              zip(prompts, letters, strict=True)]  # fmt: skip
    assert picked == [options[int(s.argmax())] for options, s in zip(letters, scores, strict=True)]
    assert answer(system, "sequential_recommendation", prompts, 3, closed=False) == system.generate(
        "sequential_recommendation", prompts, 3)  # fmt: skip
