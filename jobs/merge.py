"""Model Merge: combine checkpoints of one TMoLE run into one self-contained, checksummed artifact."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.config import cli  # noqa: E402
from recfound.merge.artifact import MergeConfig, merge_checkpoints  # noqa: E402
from recfound.train.checkpoint import CorruptCheckpointError  # noqa: E402

USAGE = """
    python jobs/merge.py checkpoints=<ckpt>[,<ckpt>...] method=linear|ties|slerp out=<dir>
                         [density=0.8] [t=0.6] [weights=[0.5,0.5]] [export_tasks=u2i,q2i]

    Writes <dir>/adapter/, <dir>/tokenizer/, optional <dir>/tasks/<task>/ (plain transformers models)
    and <dir>/manifest.json (SHA-256 per file, source checkpoints, method, parameters). Prints <dir>.
"""


def main(argv: list[str] | None = None) -> int:
    cfg = cli(MergeConfig, argv, USAGE)
    try:
        out = merge_checkpoints(cfg)
    except (CorruptCheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
