"""User-understanding generative tasks (sequential recommendation, candidate ranking, sentiment, user profile,
explanations) and query rewriting.

Rows follow the user's leave-last-out split: a training prompt only ever shows training interactions, so the
held-out next item cannot leak into a history or an option list.
"""

from __future__ import annotations

import re
from collections import Counter

from recfound.data.context import Context
from recfound.data.embedding_tasks import history
from recfound.data.esci import Esci
from recfound.data.rows import GenerativeRow, Sample, TaskUnavailable
from recfound.data.split import Timeline
from recfound.data.templates import (
    INSTRUCTIONS,
    LETTERS,
    NO,
    SENTIMENTS,
    YES,
    alpaca,
    candidate_text,
    history_text,
    lettered,
    pick,
    profile_text,
)
from recfound.tasks import SPLITS

REVIEW_WORDS = 300  # long reviews are cut: the sentiment shows early and prompts must fit the context
PROFILE_QUOTES = 3
EXPLANATION_WORDS = (3, 40)  # an explanation shorter says nothing ("Great"), longer is a review, not a reason
# Review titles that only restate the rating (Amazon's star-rating defaults), not a reason to like the item.
RATING_TITLE = re.compile(r"^(one|two|three|four|five|[1-5])\s+stars?\.?$", re.IGNORECASE)
RANKING_NEGATIVES = 1  # "no" rows per "yes" row: balanced, so always answering "yes" (or "no") is worth nothing


def sequential_recommendation_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """History -> the letter of the next item among ``sr_options`` shuffled options (the rest are negatives)."""
    task = "sequential_recommendation"
    out: list[Sample] = []
    own = frozenset(i.item for _, i in timeline)
    for t in range(1, len(timeline)):
        split, target = timeline[t]
        rng = ctx.rng(task, user, t)
        options = [target.item, *ctx.negatives(rng, target.item, own, min(ctx.sr_options, len(LETTERS)) - 1)]
        rng.shuffle(options)
        titles = lettered([ctx.catalogue[o].title for o in options])
        prompt = alpaca(pick(rng, INSTRUCTIONS[task]), history(ctx, timeline, t), titles)
        answer = LETTERS[options.index(target.item)]
        out.append((split, GenerativeRow(prompt, answer, user, target.item, ctx.source)))
    return out


def candidate_ranking_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """History -> will the user buy this candidate next (M6-Rec's and P5's ranking as a yes/no question): per
    interaction after the first, "yes" for the item bought and "no" for ``RANKING_NEGATIVES`` items sampled
    (seeded per row, same category first) from the catalogue minus everything the user ever bought. Both rows
    share one instruction and the history before the target, and take the target's split, so a held-out item is
    never a candidate, a negative or a history entry in that user's training rows."""
    task = "candidate_ranking"
    out: list[Sample] = []
    own = frozenset(i.item for _, i in timeline)
    for t in range(1, len(timeline)):
        split, target = timeline[t]
        rng = ctx.rng(task, user, t)
        instruction, past = pick(rng, INSTRUCTIONS[task]), history(ctx, timeline, t)
        negatives = ctx.negatives(rng, target.item, own, RANKING_NEGATIVES)
        for item, answer in [(target.item, YES), *((n, NO) for n in negatives)]:
            prompt = alpaca(instruction, candidate_text(past, ctx.catalogue[item].title))
            out.append((split, GenerativeRow(prompt, answer, user, item, ctx.source)))
    return out


def sentiment_analysis_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """Review text -> one of five sentiments, read off the star rating the reviewer gave."""
    task = "sentiment_analysis"
    options = SENTIMENTS[::-1]  # listed from very positive to very negative
    out: list[Sample] = []
    for t, (split, event) in enumerate(timeline):
        body = " ".join(event.text.split()[:REVIEW_WORDS])
        if not (body or event.summary):
            continue
        text = f"Review title: {event.summary}\nReview: {body}" if event.summary else f"Review: {body}"
        label = SENTIMENTS[min(max(round(event.rating), 1), 5) - 1]
        prompt = alpaca(pick(ctx.rng(task, user, t), INSTRUCTIONS[task]), text, options)
        out.append((split, GenerativeRow(prompt, label, user, event.item, ctx.source)))
    return out


def user_profile_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """One row per user and split: the history up to that split's last interaction -> a profile written from
    the categories, brands, ratings and review summaries of exactly those interactions."""
    task = "user_profile"
    out: list[Sample] = []
    for split in SPLITS:
        ends = [t for t, (s, _) in enumerate(timeline) if s == split]
        if not ends:
            continue
        events = [e for _, e in timeline[: ends[-1] + 1]][-ctx.max_history :]
        items = [ctx.catalogue[e.item] for e in events]
        lines = [f"{item.title} (rated {e.rating:g} of 5)" for item, e in zip(items, events, strict=True)]
        categories = Counter(i.category for i in items if i.category)
        brands = Counter(i.brand for i in items if i.brand)
        quotes = list(dict.fromkeys(e.summary for e in reversed(events) if e.summary))[:PROFILE_QUOTES]
        response = profile_text(
            [c for c, _ in sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))[:3]],
            [b for b, n in sorted(brands.items(), key=lambda kv: (-kv[1], kv[0]))[:2] if n > 1],
            sum(e.rating for e in events) / len(events),
            quotes,
        )
        prompt = alpaca(pick(ctx.rng(task, user, split), INSTRUCTIONS[task]), history_text(lines))
        out.append((split, GenerativeRow(prompt, response, user, "", ctx.source)))
    return out


def build_query_rewriting(ctx: Context) -> list[Sample]:
    """Query -> the title of a product judged an exact match: the precise search the shopper meant."""
    task = "query_rewriting"
    exact: dict[str, list[tuple[str, str]]] = {}
    for j in ctx.judgements:
        known = ctx.catalogue.get(j.item)
        title = j.title or (known.title if known is not None and known.has_meta else "")
        if j.label is Esci.EXACT and title:
            exact.setdefault(j.query, []).append((j.item, title))
    if not exact:
        why = "no query judgements given (queries=)" if not ctx.judgements else "no exact-match product has text"
        raise TaskUnavailable(f"needs ESCI judgements with product titles: {why}")
    out: list[Sample] = []
    for query in sorted(exact):
        rng = ctx.rng(task, query)
        item, title = sorted(exact[query])[rng.randrange(len(exact[query]))]
        row = GenerativeRow(alpaca(pick(rng, INSTRUCTIONS[task]), query), title, "", item, "esci")
        out.append((ctx.split(f"query:{query}"), row))
    return out


def explanation(summary: str, text: str) -> str | None:
    """The reviewer's reason, as P5 takes it: the review title, or else the review's first sentence, when either
    is between ``EXPLANATION_WORDS`` long and is not a bare star rating."""
    first_sentence = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0] if text.strip() else ""
    for candidate in (summary.strip(), first_sentence):
        words = candidate.split()
        if EXPLANATION_WORDS[0] <= len(words) <= EXPLANATION_WORDS[1] and not RATING_TITLE.match(candidate):
            return " ".join(words)
    return None


def explanation_generation_rows(ctx: Context, user: str, timeline: Timeline) -> list[Sample]:
    """History before the interaction + the item -> why this user likes it: the review's title or first sentence
    (P5's explanation task), for reviews rated 4 or 5 (a low rating explains a dislike). Split follows the
    interaction's, and the history holds only earlier items, so a held-out review never leaks into a prompt."""
    task = "explanation_generation"
    out: list[Sample] = []
    for t, (split, event) in enumerate(timeline):
        reason = explanation(event.summary, event.text) if event.rating >= 4 else None
        if reason is None:
            continue
        text = (
            f"Purchase history:\n{history(ctx, timeline, t) or '(none)'}\n\nProduct: {ctx.catalogue[event.item].title}"
        )
        prompt = alpaca(pick(ctx.rng(task, user, t), INSTRUCTIONS[task]), text)
        out.append((split, GenerativeRow(prompt, reason, user, event.item, ctx.source)))
    return out
