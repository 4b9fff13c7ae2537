"""Benchmarks of the platform, each a ratio measured side by side in one run; prints tables, writes JSON.

    python jobs/benchmark.py adapter [--backbone smollm2-135m]   # TMoLE vs equal-rank LoRA vs frozen backbone
    python jobs/benchmark.py train                               # TorchTrainer step vs a plain PyTorch loop
    python jobs/benchmark.py configs [data=<dataset dir>]        # each training config: s/step, tokens/s, memory
    python jobs/benchmark.py data                                # build + Ray Data tokenise vs training's appetite
    python jobs/benchmark.py serve                               # Ray Serve HTTP vs direct engine calls
    python jobs/benchmark.py serve --load [--clients 1000]       # 70/20/10 mix at capacity, then 2x: 503s, memory
    python jobs/benchmark.py serve --abuse                       # oversized requests: 413/400 latency, p99 under abuse
    python jobs/benchmark.py search                              # exact vs faiss IVF item search, 10k-1M items
    python jobs/benchmark.py quality data=<dataset dir> out=<dir> [config=<yaml>]
                                                                 # train + evaluate: win/lose per baseline
    python jobs/benchmark.py ablation data=<dataset dir> out=<dir> name=<variant> variant.<key>=<value> [seeds=0,1,2]
                                                                 # recipe vs one change of it: difference + interval
    python jobs/benchmark.py exit model=<checkpoint or merged dir> data=<dataset dir> [layers=<k,k,...>]
                                                                 # early-exit embeddings: speed and metric per layer
    python jobs/benchmark.py export model=<merged dir> data=<dataset dir> [tasks=u2i,i2i] [onnx=false]
                                                                 # int8 exports vs fp32: speed, cosine, metric
    python jobs/benchmark.py <subcommand> --help                 # every option, with its default

Options are --key value or key=value (quality, ablation: train.<key>=value overrides the recipe; ablation:
variant.<key>=value is the change measured). Each writes its report
as JSON: to --out, or quality and ablation to <out>/<subcommand>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.bench import (  # noqa: E402
    ablation,
    adapter,
    configs,
    data,
    early_exit,
    export,
    quality,
    search,
    serve,
    serve_load,
    train,
)
from recfound.bench.common import add_arguments, config_from  # noqa: E402
from recfound.config import Config  # noqa: E402

SUBCOMMANDS = {
    "adapter": (adapter.AdapterBench, adapter.run),
    "train": (train.TrainBench, train.run),
    "configs": (configs.ConfigsBench, configs.run),
    "data": (data.DataBench, data.run),
    "serve": (serve.ServeLoadBench, serve_load.run),
    "search": (search.SearchBench, search.run),
    "quality": (quality.QualityBench, quality.run),
    "ablation": (ablation.AblationBench, ablation.run),
    "exit": (early_exit.ExitBench, early_exit.run),
    "export": (export.ExportBench, export.run),
}


def _flags(argv: list[str]) -> list[str]:
    """The issues' ``key=value`` form -> ``--key value`` for the subcommand's own keys; ``train.max_steps=5`` ->
    ``--train max_steps=5`` (an override passed through to a nested config)."""
    fields = SUBCOMMANDS[argv[0]][0].model_fields if argv and argv[0] in SUBCOMMANDS else {}
    out = argv[:1]
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        head, dot, rest = key.partition(".")
        if sep and key in fields:
            out += [f"--{key.replace('_', '-')}", value]
        elif sep and dot and head in fields:
            out += [f"--{head.replace('_', '-')}", f"{rest}={value}"]
        else:
            out.append(arg)
    return out


def parse(argv: list[str]) -> tuple[str, Config, str | None]:
    """The subcommand, its validated config and the report path asked for (None: the default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _) in SUBCOMMANDS.items():
        summary = (cls.__doc__ or "").strip()
        sub = commands.add_parser(name, help=summary.splitlines()[0], description=summary)
        add_arguments(sub, cls)
        if "out" not in cls.model_fields:
            sub.add_argument("--out", help=f"JSON report path (default: runs/bench/<report>.json, e.g. {name}.json)")
    args = parser.parse_args(_flags(argv))
    bench = config_from(SUBCOMMANDS[args.command][0], args)
    out = Path(bench.out) / f"{args.command}.json" if "out" in type(bench).model_fields else args.out
    return args.command, bench, out and str(out)


def main(argv: list[str] | None = None) -> int:
    command, bench, out = parse(list(sys.argv[1:] if argv is None else argv))
    report = SUBCOMMANDS[command][1](bench)
    print(report.render())
    out = out or f"runs/bench/{report.benchmark}.json"
    print(f"\nwrote {report.write(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
