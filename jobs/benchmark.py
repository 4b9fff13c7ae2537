"""Benchmarks of the platform, each a ratio measured side by side in one run; prints tables, writes JSON.

    python jobs/benchmark.py adapter [--backbone smollm2-135m]   # TMoLE vs equal-rank LoRA vs frozen backbone
    python jobs/benchmark.py train                               # TorchTrainer step vs a plain PyTorch loop
    python jobs/benchmark.py data                                # build + Ray Data tokenise vs training's appetite
    python jobs/benchmark.py serve                               # Ray Serve HTTP vs direct engine calls
    python jobs/benchmark.py <subcommand> --help                 # every option, with its default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.bench import adapter, data, serve, train  # noqa: E402
from recfound.bench.common import add_arguments, config_from  # noqa: E402

SUBCOMMANDS = {
    "adapter": (adapter.AdapterBench, adapter.run),
    "train": (train.TrainBench, train.run),
    "data": (data.DataBench, data.run),
    "serve": (serve.ServeBench, serve.run),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _) in SUBCOMMANDS.items():
        summary = (cls.__doc__ or "").strip()
        sub = commands.add_parser(name, help=summary.splitlines()[0], description=summary)
        add_arguments(sub, cls)
        sub.add_argument("--out", default=f"runs/bench/{name}.json", help="JSON report path (default: %(default)s)")
    args = parser.parse_args(argv)
    cls, run = SUBCOMMANDS[args.command]
    report = run(config_from(cls, args))
    print(report.render())
    print(f"\nwrote {report.write(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
