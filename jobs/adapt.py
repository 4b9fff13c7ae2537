"""Adapt a merged model to a new task or domain by training ~1 % of its adapter: task-table rows (+ soft prompts or a
private expert)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.config import cli  # noqa: E402
from recfound.train.adapt import AdaptConfig, adapt  # noqa: E402

USAGE = """
    python jobs/adapt.py model=<merged dir> data=<dataset dir> tasks=<task>[,<task>...] out=<dir>
                         [method=task_embedding|prompt|expert|full] [steps=100] [rows=<few-shot train rows per task>]

    Freezes every TMoLE expert, router and the backbone and trains only each task's task-table row (the routers'
    input) and, with method=prompt, prompt_tokens soft-prompt vectors in front of its inputs, or with method=expert
    a private rank-expert_rank LoRA expert of the task in every adapted linear. method=full trains every expert and
    router too (the reference the others are measured against; the model's other tasks change). A task the model lacks
    gets a new row; a task it has continues from its own row on this data. Writes a merged-model artifact (adapter/,
    tokenizer/, manifest.json with SHA-256 per file, the adapted tasks, method, trained-parameter count and share,
    valid loss before and after) that jobs/publish.py and jobs/evaluate.py take as they take jobs/merge.py's.
    Prints a summary line, then <dir>.
"""


def main(argv: list[str] | None = None) -> int:
    cfg = cli(AdaptConfig, argv, USAGE)
    try:
        out = adapt(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    losses = ", ".join(f"{t} {v['before']:.4f} -> {v['after']:.4f}" for t, v in manifest["valid_loss"].items())
    print(
        f"trained {manifest['trained_parameters']:,} of {manifest['adapter_parameters']:,} adapter parameters "
        f"({manifest['trained_share']:.2%}); valid loss {losses}"
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
