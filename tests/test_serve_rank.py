"""/v1/rank's generative scorer on the Model replica in process (fake engine): a model trained on candidate_ranking
ranks a user's candidates one yes/no question each, by yes minus no; one without it letters them (at most 20)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_serve_engine import make_artifact, make_dataset, publish_fake

from recfound.data.templates import INSTRUCTIONS, NO, YES, alpaca, candidate_text
from recfound.serving.errors import ApiError
from recfound.serving.index import user_text
from recfound.serving.model import ModelReplica
from recfound.serving.rank import rank_question
from recfound.serving.schemas import RankRequest, Scorer
from recfound.tasks import ALL_TASKS

CANDIDATES = ["i4", "i5", "i6"]
pytestmark = pytest.mark.usefixtures("replica_context")
TITLES = {
    "i1": "red running shoes",
    "i2": "blue running shoes",
    "i4": "espresso coffee beans",
    "i5": "ceramic coffee mug",
    "i6": "stainless steel kettle",
}


def _replica(loop: asyncio.Runner, tmp_path: Path, tasks: tuple[str, ...]) -> tuple[ModelReplica, list[tuple]]:
    """A replica serving a fake model trained on ``tasks``, its engine's choice calls recorded; a call's (yes, no)
    scores are (position of the prompt, 0), so the last prompt's candidate is the likeliest."""
    registry = str(tmp_path / "registry")
    publish_fake(make_artifact(tmp_path / "model", tasks=tasks), make_dataset(tmp_path / "data"), registry)
    replica = ModelReplica(registry, {})
    loop.run(replica.reconfigure({"version": "v1"}))
    engine, calls = replica._live.engine, []
    original = engine.choice_scores

    def recorded(task: str, prompts: list[str], choices: list[str]) -> np.ndarray:
        calls.append((task, prompts, choices))
        if choices == [YES, NO]:
            return np.array([[float(i), 0.0] for i in range(len(prompts))], dtype=np.float32)
        return original(task, prompts, choices)

    engine.choice_scores = recorded
    return replica, calls


def _rank(loop: asyncio.Runner, replica: ModelReplica, candidates: list[str]) -> Any:
    return loop.run(
        replica.rank(RankRequest(task="u2i", history=["i1", "i2"], candidates=candidates, scorer=Scorer.GENERATIVE))
    )


def test_a_model_trained_on_candidate_ranking_asks_one_question_per_candidate(
    loop: asyncio.Runner, tmp_path: Path
) -> None:
    replica, calls = _replica(loop, tmp_path, ALL_TASKS)
    ranked = _rank(loop, replica, CANDIDATES)
    history = user_text([TITLES["i1"], TITLES["i2"]], 3)
    instruction = INSTRUCTIONS["candidate_ranking"][0]
    assert calls == [
        ("candidate_ranking", [alpaca(instruction, candidate_text(history, TITLES[c])) for c in CANDIDATES], [YES, NO])
    ]
    assert [(i.item_id, i.score) for i in ranked.items] == [("i6", 2.0), ("i5", 1.0), ("i4", 0.0)]
    assert len(rank_question("u2i", history, ["a title"] * 21, ALL_TASKS).prompts) == 21  # no letter limit


def test_a_model_without_it_letters_the_candidates(loop: asyncio.Runner, tmp_path: Path) -> None:
    replica, calls = _replica(loop, tmp_path, tuple(t for t in ALL_TASKS if t != "candidate_ranking"))
    ranked = _rank(loop, replica, CANDIDATES)
    [(task, [prompt], choices)] = calls
    assert task == "sequential_recommendation" and choices == ["A", "B", "C"]
    assert "### Options:\nA: espresso coffee beans\nB: ceramic coffee mug\nC: stainless steel kettle" in prompt
    assert {i.item_id for i in ranked.items} == set(CANDIDATES)
    with pytest.raises(ApiError, match="not trained on candidate_ranking.*at most 20"):
        rank_question("u2i", "1. a title", ["a title"] * 21, ["u2i", "sequential_recommendation"])
