"""Evaluate a RecFound model against baselines on a built dataset, or compare several runs in one report.

Embedding tasks: the paper's sampled pools and the full catalogue; generative tasks: greedy decoding scored by
the paper's metric; candidate_ranking also over candidate lists (the item bought + 19 sampled, NDCG@10 and AUC).
Writes <out>/results.json, <out>/report.md and PNG plots, and prints the tables.
"""

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
# Evaluation never downloads: a backbone missing from this machine fails at once with its name, not on a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from recfound.config import cli  # noqa: E402
from recfound.eval.compare import compare  # noqa: E402
from recfound.eval.config import EvalConfig, EvalError  # noqa: E402
from recfound.eval.report import tables  # noqa: E402
from recfound.eval.runner import evaluate  # noqa: E402
from recfound.eval.systems import ModelError  # noqa: E402

USAGE = """
    python jobs/evaluate.py model=<checkpoint, run dir, merged artifact or adapter> data=<dataset dir> out=<dir>
                            [baselines=all|none|popularity,bm25,item_cf,minilm,backbone] [split=valid|test]
                            [max_rows_per_task=<n per generative task; 0 skips them>] [tasks=u2i,q2i,...]
                            [exit_layer=<k: embed with the first k decoder layers (early exit)>]
    python jobs/evaluate.py --compare <results or run dir> <results or run dir> ... out=<dir>

    Writes <out>/results.json ({"systems": {system: {task: {metric: value}}}, ...}), <out>/report.md, one
    PNG per protocol and, for a training checkpoint, its convergence table with loss and weight curves.
"""


def _compare_flag(argv: list[str]) -> list[str]:
    """``--compare A B ...`` -> ``compare=["A", "B", ...]``: the directories run until the next key or flag."""
    if "--compare" not in argv:
        return argv
    i = argv.index("--compare")
    end = next((j for j in range(i + 1, len(argv)) if "=" in argv[j] or argv[j].startswith("--")), len(argv))
    if end == i + 1:
        raise SystemExit("--compare needs at least one results or run directory")
    return argv[:i] + argv[end:] + [f"compare={json.dumps(argv[i + 1 : end])}"]


def main(argv: list[str] | None = None) -> int:
    argv = _compare_flag(list(sys.argv[1:] if argv is None else argv))
    cfg = cli(EvalConfig, argv, USAGE)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = compare(cfg) if cfg.compare else evaluate(cfg)
    except (EvalError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(tables(results["systems"]))
    print(f"\nreport: {Path(cfg.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
