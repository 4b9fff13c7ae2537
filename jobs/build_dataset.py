"""Build the RecFound multi-task dataset (parquet per task and split) from raw review, metadata and query files.

With no arguments it generates a small synthetic shop under <out>/raw/ and builds from it.
"""

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.config import cli  # noqa: E402
from recfound.data.builder import BuildConfig, build  # noqa: E402
from recfound.data.sources import DataError  # noqa: E402

USAGE = """
    python jobs/build_dataset.py [--config FILE] [key=value ...]

    python jobs/build_dataset.py                                   # synthetic catalogue -> runs/data/synthetic
    python jobs/build_dataset.py reviews=R.json.gz meta=M.json.gz [queries=Q.parquet] out=DIR [seed=N]

    Writes DIR/tasks/<task>/<split>.parquet, DIR/items.parquet, DIR/interactions.parquet and, last,
    DIR/manifest.json (row counts, sources with sha256, seed, config, skipped tasks and why).
"""


def main(argv: list[str] | None = None) -> int:
    cfg = cli(BuildConfig, argv, USAGE)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        manifest = build(cfg)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    total = sum(manifest["rows"].values())
    print(f"{'task':<30}{'train':>9}{'valid':>9}{'test':>9}")
    for task, counts in manifest["tasks"].items():
        print(f"{task:<30}{counts['train']:>9}{counts['valid']:>9}{counts['test']:>9}")
    for task, reason in manifest["skipped_tasks"].items():
        print(f"{task:<30} skipped: {reason}")
    if manifest["quarantined"]["total"]:
        print(f"quarantined rows: {manifest['quarantined']['total']} (see {cfg.out}/quarantine.jsonl)")
    print(f"{total} rows in {seconds:.2f} s ({total / seconds:,.0f} rows/s) -> {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
