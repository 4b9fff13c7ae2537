"""The published RecFound dataset (GritLM JSON lines) -> our task rows, so it trains without conversion.

Embedding rows: ``{"query": [instr, text], "pos": [[instr, text], ...], "neg": [...], "task": "Emb_user"}``;
generative rows: ``{"text": [prompt, response], "task": "Sequential_Recommendation"}``. GritLM samples one
positive per step; we write one row per positive so every positive is seen. Negatives share the positive's
instruction, which is how the released data is built.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from recfound.data.rows import EmbeddingRow, GenerativeRow, Row, Sample, Split
from recfound.data.sources import BadRows, DataError, check_text, parse_json, read_lines, show
from recfound.data.split import hash_split
from recfound.io import exists
from recfound.tasks import ALL_TASKS, EMBEDDING_TASKS, SPLITS

SPLIT_PLACEHOLDER = "{split}"
# Task names in the released code (training/data.py task table) -> ours; ours are accepted as they are.
TASK_NAMES = {"emb_user": "u2i", "emb_query": "q2i", "emb_item": "i2i", **{t: t for t in ALL_TASKS}}


def text_id(text: str) -> str:
    """Released rows carry texts, not item ids; a content hash lets evaluation pool identical texts."""
    return "txt-" + hashlib.sha1(text.encode()).hexdigest()[:16]


def _pair(value: Any, url: str, line: int, key: str) -> tuple[str, str]:
    if isinstance(value, str):
        return "", check_text(value, url, line, key)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return check_text(value[0], url, line, key), check_text(value[1], url, line, key)
    raise DataError(url, f"expected [instruction, text] or a text, got {show(value)}", line, key)


def _source(obj: dict[str, Any], url: str, line: int) -> str:
    """The row's provenance, written to every task table as it is."""
    source = obj.get("source") or "gritlm"
    if not isinstance(source, str):
        raise DataError(url, f"expected a string, got {show(source)}", line, "source")
    return check_text(source, url, line, "source")


def _split_key(obj: dict[str, Any], raw: str, url: str, line: int) -> str:
    """What the hash split keys on: the row's id when it has one (text or number), else the line itself."""
    key = obj.get("id")
    if key is None:
        return raw
    if isinstance(key, str):
        return check_text(key, url, line, "id")
    if not isinstance(key, int | float):
        raise DataError(url, f"expected a text or number id, got {show(key)}", line, "id")
    return str(key)


def _row(obj: Any, url: str, line: int) -> tuple[str, list[Row]]:
    if not isinstance(obj, dict):
        raise DataError(url, f"expected a JSON object, got {type(obj).__name__}", line)
    name = obj.get("task")
    task = TASK_NAMES.get(str(name).lower()) if isinstance(name, str) else None
    if task is None:
        known = "Emb_user, Emb_query, Emb_item, " + ", ".join(ALL_TASKS[3:])
        raise DataError(url, f"unknown task {show(name)}; known tasks: {known}", line, "task")
    source = _source(obj, url, line)
    if task in EMBEDDING_TASKS:
        q_instruction, query = _pair(obj.get("query"), url, line, "query")
        positives = obj.get("pos")
        negatives = obj.get("neg") or []
        if not isinstance(positives, list) or not positives:
            raise DataError(url, "expected a non-empty list of positives", line, "pos")
        if not isinstance(negatives, list):
            raise DataError(url, "expected a list of negatives", line, "neg")
        neg = tuple(_pair(n, url, line, "neg")[1] for n in negatives)
        rows: list[Row] = []
        for p in positives:
            p_instruction, pos = _pair(p, url, line, "pos")
            rows.append(
                EmbeddingRow(
                    q_instruction, query, p_instruction, pos, text_id(pos), neg, tuple(map(text_id, neg)), source=source
                )
            )
        return task, rows
    text = obj.get("text")
    if not (isinstance(text, list) and len(text) == 2 and all(isinstance(t, str) for t in text)):
        raise DataError(url, f"expected [prompt, response] (one turn), got {show(text)}", line, "text")
    prompt, response = (check_text(t, url, line, "text") for t in text)
    return task, [GenerativeRow(prompt, response, source=source)]


def _read(url: str, bad: BadRows, split_of: Callable[[str], Split]) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    seen = 0
    for line, raw in read_lines(url):
        seen += 1
        try:
            obj = parse_json(url, line, raw)
            task, rows = _row(obj, url, line)
            split = split_of(_split_key(obj, raw, url, line))
        except DataError as err:
            bad.report(err)
            continue
        out[task].extend((split, row) for row in rows)
    if not seen:
        raise DataError(url, "empty file: no rows")
    bad.check(url, seen)
    return out


def gritlm_urls(url: str) -> dict[Split, str] | None:
    """With a ``{split}`` placeholder, the released train/valid/test files (those present); else None."""
    if SPLIT_PLACEHOLDER not in url:
        return None
    files = {split: url.replace(SPLIT_PLACEHOLDER, split) for split in SPLITS}
    return {split: file for split, file in files.items() if exists(file)}  # type: ignore[misc]


def read_gritlm(url: str, bad: BadRows, seed: int, holdout: float) -> dict[str, list[Sample]]:
    """Rows per task; one file is split by a seeded hash of each row's id, per-split files keep their split."""
    files = gritlm_urls(url)
    if files is None:
        return dict(_read(url, bad, lambda key: hash_split(seed, f"gritlm:{key}", holdout)))
    if "train" not in files:
        raise DataError(url.replace(SPLIT_PLACEHOLDER, "train"), "no such file (needed for {split} URLs)")
    out: dict[str, list[Sample]] = defaultdict(list)
    for split, file in files.items():
        for task, samples in _read(file, bad, lambda _key, s=split: s).items():
            out[task].extend(samples)
    return dict(out)
