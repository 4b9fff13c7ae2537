"""Build the RecFound multi-task dataset (parquet per task and split) from raw review, metadata and query files.

With no arguments it generates a small synthetic shop under <out>/raw/ and builds from it; ``synthetic-dump`` writes
a raw dump of any size (sharded, in the Amazon 2018 format) to build from.
"""

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.config import cli  # noqa: E402
from recfound.data.builder import BuildConfig, build  # noqa: E402
from recfound.data.sources import DataError  # noqa: E402
from recfound.data.synthetic_dump import DumpConfig, write_dump  # noqa: E402

USAGE = """
    python jobs/build_dataset.py [--config FILE] [key=value ...]

    python jobs/build_dataset.py                                   # synthetic catalogue -> runs/data/synthetic
    python jobs/build_dataset.py reviews=R.json.gz meta=M.json.gz [queries=Q.parquet] out=DIR [seed=N]
    python jobs/build_dataset.py reviews='s3://b/reviews/*.json.gz' meta=s3://b/meta/ out=DIR   # sharded dumps
    python jobs/build_dataset.py synthetic-dump reviews=N shards=K out=RAW   # a synthetic dump; --help: its keys

    An input is a file, a directory (its *.json, *.json.gz, *.jsonl, *.jsonl.gz files), a glob or a comma list of
    these, read in sorted order as one file. Writes DIR/tasks/<task>/<split>.parquet, DIR/items.parquet,
    DIR/interactions.parquet and, last, DIR/manifest.json (row counts, every source file with its sha256, seed,
    config, skipped tasks and why).
"""
DUMP_USAGE = """
    python jobs/build_dataset.py synthetic-dump [reviews=N] [shards=K] [items=M] [seed=S] [out=RAW]

    Writes a synthetic shop in the Amazon 2018 raw format at any size, streaming (memory does not grow with N):
    RAW/reviews/part-*.json.gz (N review rows) and RAW/meta/part-*.json.gz, with the real dumps' quirks (repeated
    reviews and metadata rows, item variants, items without metadata, missing fields, HTML in titles). Build it with
    python jobs/build_dataset.py reviews=RAW/reviews meta=RAW/meta out=DIR
"""


def synthetic_dump(argv: list[str]) -> int:
    cfg = cli(DumpConfig, argv, DUMP_USAGE)
    start = time.perf_counter()
    urls = write_dump(cfg)
    print(
        f"{cfg.reviews} reviews in {cfg.shards} shards in {time.perf_counter() - start:.1f} s; build with:\n"
        f"python jobs/build_dataset.py reviews={urls['reviews']} meta={urls['meta']} out=DIR"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synthetic-dump"]:
        return synthetic_dump(argv[1:])
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
