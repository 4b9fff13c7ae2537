"""/v1/rank's generative scorer: which trained generative task scores the candidates, with which prompts and answers.

Each query task reuses a generative task the model learnt its question from, rendered with the dataset's templates
(first paraphrase):
- u2i, when the model was trained on candidate_ranking: one yes/no question per candidate ("will the user buy the
  candidate next?"), scored by how much likelier "yes" is than "no" (M6-Rec's likelihood scoring, and what the
  evaluation's candidate-list protocol measures), so any number of candidates;
- u2i otherwise: sequential recommendation's "which of these will the user buy next" with the candidates as
  lettered options, a candidate's score its letter's likelihood (at most 20 letters);
- q2i: query rewriting's "which product does this query mean", a candidate's score its title's likelihood.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from recfound.data.templates import INSTRUCTIONS, LETTERS, NO, YES, alpaca, candidate_text, lettered
from recfound.serving.errors import ApiError

POINTWISE_RANKER = "candidate_ranking"
"""u2i's generative scorer when the model knows it: one question per candidate, no limit on the list."""
LISTWISE_RANKER = {"u2i": "sequential_recommendation", "q2i": "query_rewriting"}
"""Each query task's scorer that asks one question listing every candidate (u2i's fallback)."""


@dataclass(frozen=True)
class RankQuestion:
    """The choice-scoring call that ranks a request's candidates, and how its (prompts, choices) table becomes
    one score per candidate."""

    task: str
    prompts: list[str]
    choices: list[str]

    def scores(self, table: np.ndarray) -> np.ndarray:
        """A question per candidate (yes, no): yes minus no, so a candidate ranks above 0 exactly when the model would
        answer yes; one question listing them all: its row."""
        return table[:, 0] - table[:, 1] if self.task == POINTWISE_RANKER else table[0]


def rank_question(task: str, query_text: str, titles: Sequence[str], trained: Collection[str]) -> RankQuestion:
    """The question ranking ``titles`` (candidate i stands for choice or prompt i) for a model trained on
    ``trained`` tasks. ``query_text`` is the query side as training rendered it (a user's numbered history, or the
    search query)."""
    if task == "u2i" and POINTWISE_RANKER in trained:
        instruction = INSTRUCTIONS[POINTWISE_RANKER][0]
        prompts = [alpaca(instruction, candidate_text(query_text, title)) for title in titles]
        return RankQuestion(POINTWISE_RANKER, prompts, [YES, NO])
    generative = LISTWISE_RANKER[task]
    instruction = INSTRUCTIONS[generative][0]
    if task == "u2i":
        if len(titles) > len(LETTERS):
            raise ApiError(
                400,
                f"scorer=generative lists u2i candidates as lettered options for this model (it was "
                f"not trained on {POINTWISE_RANKER}): at most {len(LETTERS)}",
                "candidates",
                "too_many_inputs",
            )
        return RankQuestion(
            generative, [alpaca(instruction, query_text, lettered(titles))], list(LETTERS[: len(titles)])
        )
    return RankQuestion(generative, [alpaca(instruction, query_text)], list(titles))
