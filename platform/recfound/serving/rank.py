"""/v1/rank's generative scorer: the trained generative task, prompt and answer choices that score candidates.

Each query task reuses the generative task the model learnt its question from, rendered with the same templates
as the dataset (first paraphrase): u2i asks sequential recommendation's "which of these will the user buy next"
with the candidates as lettered options, so a candidate's score is its letter's likelihood; q2i asks query
rewriting's "which product does this query mean", so a candidate's score is its title's likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence

from recfound.data.templates import INSTRUCTIONS, LETTERS, alpaca, lettered

GENERATIVE_RANKER = {"u2i": "sequential_recommendation", "q2i": "query_rewriting"}
"""The generative task that scores each query task's candidates."""


def rank_prompt(task: str, query_text: str, titles: Sequence[str]) -> tuple[str, str, list[str]]:
    """(generative task, prompt, choices), choice i standing for candidate i. ``query_text`` is the query side as
    training rendered it (a user's numbered history, or the search query)."""
    generative = GENERATIVE_RANKER[task]
    instruction = INSTRUCTIONS[generative][0]
    if task == "u2i":
        if len(titles) > len(LETTERS):
            raise ValueError(f"{len(titles)} candidates; sequential recommendation letters at most {len(LETTERS)}")
        return generative, alpaca(instruction, query_text, lettered(titles)), list(LETTERS[: len(titles)])
    return generative, alpaca(instruction, query_text), list(titles)
