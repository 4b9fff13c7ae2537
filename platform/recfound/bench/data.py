"""Can data keep up with training? Dataset build rows/s and Ray Data tokenise+batch rows/s against the samples/s
a training step consumes (the plain loop of ``bench.train``: the fastest consumer, so the ratio is conservative).

The tokenising pipeline is the trainer's own: ``run._datasets`` (per-task ``read_parquet`` + ``map_batches(
tokenize)``), iterated to the end in the batches TaskStream asks for.

And how does the build scale? The builder's rows/s and peak memory on synthetic dumps of three sizes
(``write_dump``), each built by ``jobs/build_dataset.py`` in its own process as users run it, the local Ray it
starts included in the process tree: whether memory stays near flat as the dump grows. And with a second node?
The same dump built by the job joined to a local cluster of one node, then of two (``nodes_reviews``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.data
from pydantic import Field, field_validator

from recfound.bench.common import CONFIG_DIR, Better, Report, Table, Target, fmt, median
from recfound.bench.train import CHUNK, run_plain, summarize
from recfound.config import Config, load_config
from recfound.data.builder import BuildConfig, build
from recfound.data.synthetic import SyntheticConfig
from recfound.data.synthetic_dump import DumpConfig, write_dump
from recfound.train.config import TrainConfig
from recfound.train.run import _datasets, plan

TARGETS = [Target("Ray Data tokenise rows/s / training samples/s", "ray_data_vs_train", 1.0, Better.HIGHER)]
SCALING_TARGETS = [
    Target(
        "peak build memory (PSS), largest / middle dump (issue: 4M / 1M reviews)",
        "build_peak_pss_largest_vs_middle",
        1.5,
        Better.LOWER,
    ),
    Target(
        "peak build memory (PSS) of the largest dump, GiB (issue: at 4M reviews)",
        "build_peak_pss_largest_gib",
        4.0,
        Better.LOWER,
    ),
]
"""Issue 16's, at its sizes (100k, 1M, 4M reviews): memory near flat as the dump grows, and within a 4 GiB budget."""
NODE_TARGETS = [Target("build speed, two local nodes / one", "build_two_nodes_vs_one", 1.6, Better.HIGHER)]
"""Issue 16's: when each node has its own cores. On one machine the nodes share its cores (and the driver's)."""
BUILD_JOB = CONFIG_DIR.parent / "jobs" / "build_dataset.py"
BUILD_LINE = re.compile(r"^(\d+) rows in ([\d.]+) s ", re.MULTILINE)
"""The build job's summary line: task rows written and the build's own seconds (interpreter start-up excluded)."""
SAMPLE_S = 0.1
"""How often the build's memory is sampled: a build holds its peak for far longer than this, and reading every
process's page map (PSS) more often would take a share of the cores the build is timed on."""
MIB = 1 << 20
GIB = 1 << 30


class BuildFailed(RuntimeError):
    """A build of the scaling table exited non-zero; the message ends with its output."""


class DataBench(Config):
    """Dataset build rows/s (synthetic catalogue of a given size) and Ray Data tokenise+batch rows/s vs the
    training consumption rate (samples/s of the plain training loop) -> ratios; > 1 means data keeps up."""

    users: int = Field(1000, ge=10)
    """Synthetic users (the catalogue's size drives the build; each writes 5-12 reviews)."""
    items: int = Field(500, ge=20)
    """Synthetic items."""
    queries: int = Field(120, ge=0)
    """Synthetic search queries."""
    config: str = str(CONFIG_DIR / "tiny.yaml")
    """Training config: token budgets and batch sizes of the consumer."""
    overrides: list[str] = []
    """TrainConfig key=value overrides, e.g. tasks=[u2i,sentiment_analysis]."""
    rounds: int = Field(2, ge=1)
    """Rounds of (build, Ray Data pass, training pass), interleaved; figures are medians."""
    train_steps: int = Field(12, ge=2)
    """Plain-loop steps per round for the consumption rate."""
    skip: int = Field(2, ge=0)
    """First plain-loop steps left out (allocator warm-up)."""
    out_dir: str = "runs/bench/data"
    """Where the synthetic dataset is built (replaced each round), and the scaling dumps under scaling/."""
    scaling: list[int] = [2000, 8000, 32000]
    """Three review counts for the build-scaling table: a synthetic dump of each (jobs/build_dataset.py
    synthetic-dump) built by jobs/build_dataset.py in its own process (with the local Ray it starts), timed, its
    process tree's peak memory (PSS, and summed RSS) sampled.
    The issue's full-scale sizes are 100000 1000000 4000000 (the largest needs several GB and a while)."""
    scaling_shards: int = Field(4, ge=1)
    """Files each scaling dump is split across (the builder reads them as one)."""
    nodes_reviews: int = Field(0, ge=0)
    """Reviews of the one-vs-two-node comparison (0: not run): the middle scaling dump's format, built by
    jobs/build_dataset.py joined to a local Ray cluster (RAY_ADDRESS) of one node, then of two, each node with
    ``node_cpus`` CPUs; prints how much faster two nodes build it."""
    node_cpus: int = Field(1, ge=1)
    """CPUs each node of the comparison offers Ray (the job's driver runs beside them, on the same machine)."""

    @field_validator("scaling")
    @classmethod
    def _three_sizes(cls, sizes: list[int]) -> list[int]:
        if len(set(sizes)) != 3 or min(sizes) < 1:
            raise ValueError(f"expected three different positive review counts, got {sizes}")
        return sorted(sizes)


@dataclass(frozen=True)
class Pass:
    """Every task's batches as (seconds since start, rows), tasks streamed concurrently the way training pulls
    them. The rate counts start-up too: with pipelines finishing at different times there is no clean steady
    state to separate, and including it only makes the keep-up ratio conservative."""

    batches: dict[str, list[tuple[float, int]]]

    @property
    def rows(self) -> int:
        return sum(n for batches in self.batches.values() for _, n in batches)

    @property
    def first_batch_s(self) -> float:
        """Until every pipeline has delivered its first batch: what training's first step waits for."""
        return max(batches[0][0] for batches in self.batches.values())

    @property
    def seconds(self) -> float:
        return max(batches[-1][0] for batches in self.batches.values())


def _ray_data_pass(cfg: TrainConfig) -> Pass:
    """Every task's whole train split through the trainer's own tokenising pipelines, one consumer thread per
    task as the trainer's streams consume them: all at once, start-ups overlapped."""
    datasets = _datasets(plan(cfg), cfg)
    start = time.perf_counter()

    def drain(ds: ray.data.Dataset) -> list[tuple[float, int]]:
        return [
            (time.perf_counter() - start, len(batch["task"]))
            for batch in ds.iter_batches(batch_size=CHUNK, batch_format="numpy", prefetch_batches=2)
        ]

    with ThreadPoolExecutor(len(datasets)) as pool:
        return Pass(dict(zip(datasets, pool.map(drain, datasets.values()))))


@dataclass(frozen=True)
class ScaledBuild:
    """One build of the scaling table."""

    reviews: int
    rows: int
    """Task rows written (every task and split)."""
    seconds: float
    """The build itself, as the job reports it: without the interpreter's start-up and imports."""
    peak_pss: int
    """Bytes: the largest sum of PSS over the job's process tree, imports included: the memory the build takes."""
    peak_rss: int
    """Bytes: the largest sum of RSS over the same tree, which counts a shared page once per process using it."""


@dataclass(frozen=True)
class PeakMemory:
    """Peaks of a process tree's summed memory, each the largest of its own samples."""

    pss: int
    """Proportional set size: each shared page (Ray's object store, the libraries every worker maps) split among
    the processes sharing it, so the tree's sum counts it once. Linux; elsewhere the RSS."""
    rss: int
    """Resident set size: a shared page counted in every process that touched it."""


def peak_memory(process: subprocess.Popen) -> PeakMemory:
    """Peak summed PSS and RSS over the process and its descendants, sampled until it exits: a multi-process
    builder (Ray workers) is measured the same way as the single-process one, not by its largest process."""
    root = psutil.Process(process.pid)
    pss = rss = 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):  # the job or a child exited between listing and reading
            infos = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
            pss = max(pss, sum(getattr(i, "pss", i.rss) for i in infos))
            rss = max(rss, sum(i.rss for i in infos))
        time.sleep(SAMPLE_S)
    return PeakMemory(pss, rss)


def _run_job(args: list[str], log: Path, address: str | None = None) -> tuple[str, PeakMemory]:
    """jobs/build_dataset.py with ``args`` (on the Ray cluster at ``address``, else its own local Ray): its output
    and peak memory. Output goes to a file, not a pipe: a pipe nobody reads while the memory is sampled would fill up
    and stall the job."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ({"RAY_ADDRESS": address} if address else {})
    with log.open("w+") as output:
        command = [sys.executable, str(BUILD_JOB), *args]
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        peak = peak_memory(process)
        output.seek(0)
        text = output.read()
    if process.returncode:
        raise BuildFailed(f"build_dataset.py {' '.join(args)} exited {process.returncode}:\n{text[-3000:]}")
    return text, peak


def _scaled_build(bench: DataBench, reviews: int, address: str | None = None, name: str = "") -> ScaledBuild:
    """A dump of ``reviews`` rows (its writing not timed, reused when there), then its build, timed and its memory
    sampled; joined to the Ray cluster at ``address`` when given (the cluster's processes are not in the job's
    process tree: only the time compares then)."""
    root = Path(bench.out_dir).resolve() / "scaling" / str(reviews)
    dump = DumpConfig(reviews=reviews, shards=bench.scaling_shards, out=str(root / "raw"))
    raw, written = {role: f"{dump.out}/{role}" for role in ("reviews", "meta")}, root / "raw" / "dump.json"
    if not written.is_file() or written.read_text() != dump.model_dump_json():  # the same dump: keep it
        shutil.rmtree(root / "raw", ignore_errors=True)  # no shard of another dump left among the new ones
        raw = write_dump(dump)
        written.write_text(dump.model_dump_json())
    args = [f"reviews={raw['reviews']}", f"meta={raw['meta']}", f"out={root / ('dataset' + name)}"]
    text, peak = _run_job(args, root / f"build{name}.log", address)
    summary = BUILD_LINE.search(text)
    if summary is None:
        raise BuildFailed(f"build_dataset.py {' '.join(args)} printed no '<rows> rows in <s> s' line:\n{text[-3000:]}")
    return ScaledBuild(reviews, int(summary[1]), float(summary[2]), peak.pss, peak.rss)


def _nodes_builds(bench: DataBench) -> list[ScaledBuild]:
    """The same dump built on a local cluster of one node, then of two (``node_cpus`` each; Ray's test cluster:
    every node its own raylet and object store, as on separate machines, but sharing this machine's cores)."""
    from ray.cluster_utils import Cluster

    builds = []
    for nodes in (1, 2):
        cluster = Cluster(
            initialize_head=True, head_node_args={"num_cpus": bench.node_cpus, "include_dashboard": False}
        )
        try:
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=bench.node_cpus)
            cluster.wait_for_nodes()
            builds.append(_scaled_build(bench, bench.nodes_reviews, cluster.address, f"-{nodes}-nodes"))
        finally:
            cluster.shutdown()
    return builds


def run(bench: DataBench) -> Report:
    scaled = [_scaled_build(bench, n) for n in bench.scaling]  # before Ray starts: it would share the cores
    nodes = _nodes_builds(bench) if bench.nodes_reviews else []
    out = str(Path(bench.out_dir).resolve() / "dataset")
    build_cfg = BuildConfig(
        out=out, synthetic=SyntheticConfig(users=bench.users, items=bench.items, queries=bench.queries)
    )
    overrides = [
        *bench.overrides,
        f"data={out}",
        f"storage_path={Path(bench.out_dir).resolve() / 'storage'}",
        f"max_steps={bench.train_steps}",
        "num_workers=1",
    ]
    started_ray = not ray.is_initialized()
    if started_ray:  # as the trainer's driver does: enough logical CPUs for a worker and the tokenising tasks
        ray.init(include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()  # as train.run sets it for the trainer's pipelines
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(bench.rounds):
            start = time.perf_counter()
            manifest = build(build_cfg)
            build_s = time.perf_counter() - start
            cfg = load_config(TrainConfig, bench.config, overrides)
            tokenised = _ray_data_pass(cfg)
            rows, _ = run_plain(cfg, plan(cfg), bench.train_steps)
            consumed = summarize(rows, bench.skip)
            rounds.append(
                {
                    "build_rows": sum(manifest["rows"].values()),
                    "build_s": build_s,
                    "tokenised": {t: sum(n for _, n in b) for t, b in tokenised.batches.items()},
                    "ray_data_rows_per_s": tokenised.rows / tokenised.seconds,
                    "ray_data_startup_s": tokenised.first_batch_s,
                    "train_samples_per_s": consumed["samples_per_s"],
                    "train_step_s": consumed["step_s"],
                }
            )
    finally:
        if started_ray:
            ray.shutdown()
    return _report(bench, rounds, cfg, scaled, nodes)


def _scaling_table(scaled: list[ScaledBuild]) -> Table:
    rows = [
        [
            f"{b.reviews:,}",
            f"{b.rows:,}",
            fmt(b.seconds),
            fmt(b.reviews / b.seconds),
            fmt(b.rows / b.seconds),
            fmt(b.peak_pss / MIB),
            fmt(b.peak_rss / MIB),
        ]
        for b in scaled
    ]
    return Table(
        "Build scaling (jobs/build_dataset.py on a synthetic dump per size, its local Ray included)",
        ["reviews", "task rows", "build s", "reviews/s", "task rows/s", "peak PSS MiB", "peak summed RSS MiB"],
        rows,
    )


def _nodes_table(bench: DataBench, nodes: list[ScaledBuild]) -> Table:
    rows = [
        [str(n), str(n * bench.node_cpus), f"{b.rows:,}", fmt(b.seconds), fmt(b.reviews / b.seconds)]
        for n, b in enumerate(nodes, 1)
    ]
    title = f"One vs two local nodes ({bench.nodes_reviews:,} reviews; jobs/build_dataset.py with RAY_ADDRESS)"
    return Table(title, ["nodes", "CPUs", "task rows", "build s", "reviews/s"], rows)


def _report(
    bench: DataBench,
    rounds: list[dict[str, Any]],
    cfg: TrainConfig,
    scaled: list[ScaledBuild],
    nodes: list[ScaledBuild],
) -> Report:
    build_rate = median([r["build_rows"] / r["build_s"] for r in rounds])
    tokenise_rate = median([r["ray_data_rows_per_s"] for r in rounds])
    consume_rate = median([r["train_samples_per_s"] for r in rounds])
    ratios = {
        "ray_data_vs_train": median([r["ray_data_rows_per_s"] / r["train_samples_per_s"] for r in rounds]),
        "build_vs_train": median([r["build_rows"] / r["build_s"] / r["train_samples_per_s"] for r in rounds]),
        "build_peak_pss_largest_vs_middle": scaled[-1].peak_pss / scaled[-2].peak_pss,
    }
    if nodes:
        ratios["build_two_nodes_vs_one"] = nodes[0].seconds / nodes[1].seconds
    startup = median([r["ray_data_startup_s"] for r in rounds])
    figures = {
        "build_rows_per_s": build_rate,
        "ray_data_rows_per_s": tokenise_rate,
        "train_samples_per_s": consume_rate,
        "ray_data_startup_s": startup,
        "build_rows": rounds[0]["build_rows"],
        "build_peak_pss_largest_gib": scaled[-1].peak_pss / GIB,
        "rounds": rounds,
        "scaling": [asdict(b) for b in scaled],
        "nodes": [asdict(b) for b in nodes],
    }
    tables = [
        Table(
            "Data rates vs training consumption",
            ["stage", "rows/s", "vs training"],
            [
                ["dataset build (synthetic, end to end)", fmt(build_rate), fmt(ratios["build_vs_train"]) + "x"],
                [
                    "Ray Data read + tokenize + batch (start-up included)",
                    fmt(tokenise_rate),
                    fmt(ratios["ray_data_vs_train"]) + "x",
                ],
                ["training consumption (plain loop samples/s)", fmt(consume_rate), "1x"],
            ],
        ),
        _scaling_table(scaled),
        *([_nodes_table(bench, nodes)] if nodes else []),
    ]
    config = bench.model_dump(mode="json") | {"train_config": cfg.model_dump(mode="json")}
    report = Report("data", config, ratios, figures, tables)
    report.notes = [
        f"{rounds[0]['build_rows']} rows built per round. Ray Data streams every task's train split to the end "
        f"({sum(rounds[0]['tokenised'].values())} rows) on all of this machine's cores (in a run it shares "
        f"them with the trainer), start-up included; every pipeline had delivered a first batch after {startup:.1f} s. "
        "A training sample is one query row (with its passages) or one generative row, as in metrics.jsonl.",
        f"Build scaling: {scaled[-1].reviews / scaled[-2].reviews:.3g}x the reviews takes "
        f"{ratios['build_peak_pss_largest_vs_middle']:.3g}x the peak memory ({scaled[-1].reviews:,} vs "
        f"{scaled[-2].reviews:,} reviews, {bench.scaling_shards} shards each; PSS summed over the job's process "
        f"tree, sampled every {SAMPLE_S * 1000:.0f} ms; the summed RSS beside it counts the object store's and the "
        "libraries' shared pages once per process). Ray Data streams the reading, de-duplication and k-core; "
        "Ray tasks gather and template chunks of whole users and the driver writes their rows, but it "
        "holds the catalogue and one entry per distinct consecutive purchase (i2i), and the object store holds the "
        "de-duplicated reviews meanwhile, so some growth remains.",
    ]
    report.check(TARGETS + SCALING_TARGETS + (NODE_TARGETS if nodes else []))
    return report
