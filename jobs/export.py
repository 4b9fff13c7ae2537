"""Compact deployment: export one task of a merged model as a plain (folded) model, optionally int8 or ONNX."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.config import cli  # noqa: E402
from recfound.merge.export import ExportConfig, export  # noqa: E402

USAGE = """
    python jobs/export.py model=<merged dir> task=<task> out=<dir> [quantize=none|int8] [format=safetensors|onnx]
                          [exit_layer=<k: embedding tasks, keep the first k decoder layers (early exit)>]

    Folds the task's TMoLE experts into the base weights and writes a self-contained directory: the model (for
    u2i/q2i/i2i the decoder with the embedding read-out, for generative tasks the causal LM), its tokenizer and
    manifest.json (task, mode, source model, quantization, format, SHA-256 per file). Prints <dir>.
    Load it with recfound.merge.exported.load_export(<dir>).
"""


def main(argv: list[str] | None = None) -> int:
    cfg = cli(ExportConfig, argv, USAGE)
    try:
        out = export(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
