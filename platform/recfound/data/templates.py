"""Every instruction and text format a task row is rendered with, in one place, under one version.

A model trained on one wording must be evaluated and served with it, so any change to these strings bumps
TEMPLATE_VERSION, which the manifest records. Query-side and generative instructions have paraphrases (picked
per row by seeded RNG) so the model learns the task rather than one sentence; the item side of each embedding
task has exactly one instruction because the catalogue is embedded once, with it, for retrieval.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

TEMPLATE_VERSION = "1"

QUERY_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "u2i": (
        "Represent this sequence of user actions to predict the next product he/she will purchase",
        "Represent the products this user bought, in order, to retrieve the product they will buy next",
        "Given a user's purchase history, represent the user to find their next purchase",
    ),
    "q2i": (
        "Represent this user query to find a matching item",
        "Represent the shopping query to retrieve products that satisfy it",
        "Given a search query, represent it to find the product the shopper wants",
    ),
    "i2i": (
        "Create an embedding for the product using its title and categories to help find similar items",
        "Represent this product to retrieve products bought or viewed together with it",
        "Represent the product to find related products",
    ),
}
ITEM_INSTRUCTIONS: dict[str, str] = {
    "u2i": "Represent this product to match it with users who will purchase it next",
    "q2i": "Represent this product to match it with search queries for it",
    "i2i": "Represent this product to match it with related products",
}


def served_instructions(task: str) -> dict[str, str]:
    """{"query", "item"}: the wording an embedding task is served and evaluated with, its first query paraphrase
    and its item instruction, so every caller that embeds outside training picks the same one."""
    return {"query": QUERY_INSTRUCTIONS[task][0], "item": ITEM_INSTRUCTIONS[task]}


INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "query_rewriting": (
        "Rewrite the shopping query so that a search engine finds the product the user means.",
        "The user typed a short search query. Rewrite it as a precise product search.",
        "Turn this search query into a specific product description that matches what the shopper wants.",
    ),
    "sequential_recommendation": (
        "Given the products the user purchased, in order, pick the product they will purchase next.",
        "Based on the user's purchase history, which of the options will the user buy next? Answer with its letter.",
        "Predict the user's next purchase from the options, using the chronological purchase history.",
    ),
    "product_relation_prediction": (
        "Given two products, identify how they are related.",
        "Which relation holds between product 1 and product 2?",
        "Decide the relation between the two products from the options.",
    ),
    "sentiment_analysis": (
        "Given the user's review, identify the sentiment the user expresses about the product.",
        "What is the sentiment of this product review?",
        "Classify the review by how the user feels about the product.",
    ),
    "attribute_value_extraction": (
        "Extract the value of each listed attribute from the product text.",
        "Read the product text and give the values of the requested attributes.",
        "Find the values of the given attributes in the product text.",
    ),
    "product_matching": (
        "Do the two product listings describe the same product? Answer yes or no.",
        "Decide whether listing A and listing B refer to the same product. Answer yes or no.",
        "Are these two listings the same item? Answer yes or no.",
    ),
    "user_profile": (
        "Given the user's purchases and ratings, describe the user's preferences.",
        "Write a short profile of this shopper from their purchase history.",
        "Summarise what this user likes, based on the products they bought and how they rated them.",
    ),
    "item_profile": (
        "Given the product's metadata, write a description of the product.",
        "Describe this product for a shopper, based on its title, category, brand and features.",
        "Write the product description from the product information.",
    ),
    "answer_generation": (
        "Answer the shopper's question about the product, using the product information and reviews.",
        "Given the product and what reviewers wrote about it, answer the question.",
        "Reply to this product question as a helpful customer who owns the product would.",
    ),
    "explanation_generation": (
        "Given the user's purchase history and a product, explain why the user would like the product.",
        "Write a short explanation of why this product suits this shopper, based on what they bought before.",
        "In one sentence, say what this user will appreciate about the product.",
    ),
    "candidate_ranking": (
        "Given the user's purchase history, will the user buy the candidate product next? Answer yes or no.",
        "Based on what this shopper bought before, decide whether the candidate product is their next purchase. "
        "Answer yes or no.",
        "Is the candidate product the next thing this user buys, judging from their purchase history? "
        "Answer yes or no.",
    ),
    "answerability_prediction": (
        "Can the question be answered from the product information and reviews? Answer yes or no.",
        "Decide whether the reviews contain the answer to the shopper's question. Answer yes or no.",
        "Is there enough information in the reviews to answer this question? Answer yes or no.",
    ),
}

SENTIMENTS = ("very negative", "negative", "neutral", "positive", "very positive")  # index = rating - 1
RELATIONS = ("also buy", "also view", "similar")
YES, NO = "yes", "no"
LETTERS = "ABCDEFGHIJKLMNOPQRST"


def pick(rng: random.Random, choices: Sequence[str]) -> str:
    return choices[rng.randrange(len(choices))]


def alpaca(instruction: str, text: str, options: Sequence[str] = ()) -> str:
    """Alpaca-style prompt; the chat markers and the response are added by the model side."""
    parts = [f"### Instruction:\n{instruction}", f"### Input:\n{text}"]
    if options:
        parts.append("### Options:\n" + "\n".join(options))
    return "\n\n".join([*parts, "### Response:"])


def lettered(options: Sequence[str]) -> list[str]:
    return [f"{LETTERS[i]}: {option}" for i, option in enumerate(options)]


def item_text(title: str, categories: Sequence[str], brand: str) -> str:
    """The item side of every embedding task and the ``text`` column of items.parquet."""
    parts = [f"Title: {title}"]
    if categories:
        parts.append("Category: " + " > ".join(categories))
    if brand:
        parts.append(f"Brand: {brand}")
    return "; ".join(parts)


def history_text(titles: Sequence[str]) -> str:
    """A user's items, oldest first, numbered so order survives tokenisation."""
    return "\n".join(f"{i}. {title}" for i, title in enumerate(titles, start=1))


def candidate_text(history: str, title: str) -> str:
    """candidate_ranking's input: the user's numbered history, then the one product asked about."""
    return f"Purchase history:\n{history}\n\nCandidate product: {title}"


_RANKING_INPUT = re.compile(
    r"Purchase history:\n(?P<history>.*)\n\nCandidate product: (?P<title>.*)\n\n### Response:\Z", re.DOTALL
)


def ranking_input(prompt: str) -> re.Match[str]:
    """The ``history`` and ``title`` spans of a candidate_ranking prompt (the title follows the last "Candidate
    product:" label, so a history title holding the label still parses); ValueError when ``prompt`` is not one."""
    match = _RANKING_INPUT.search(prompt)
    if match is None:
        raise ValueError(
            "not a candidate_ranking prompt: no 'Purchase history:' ... 'Candidate product: <title>' "
            "input before '### Response:'"
        )
    return match


def with_candidate(prompt: str, title: str) -> str:
    """The candidate_ranking prompt asking about ``title`` instead: same instruction and history, so a list's
    candidates differ only in the product named."""
    match = ranking_input(prompt)
    return prompt[: match.start("title")] + title + prompt[match.end("title") :]


def pair_text(first: str, second: str, names: tuple[str, str] = ("Product 1", "Product 2")) -> str:
    return f"{names[0]}: {first}\n{names[1]}: {second}"


def profile_text(categories: Sequence[str], brands: Sequence[str], mean_rating: float, quotes: Sequence[str]) -> str:
    """A user profile built only from what the user did and wrote, so it is a fair generation target."""
    parts = []
    if categories:
        parts.append("Mostly buys " + ", ".join(categories) + " products.")
    if brands:
        parts.append("Favourite brands: " + ", ".join(brands) + ".")
    parts.append(f"Average rating given: {mean_rating:.1f} of 5.")
    if quotes:
        parts.append("In their words: " + "; ".join(f'"{q}"' for q in quotes) + ".")
    return " ".join(parts)
