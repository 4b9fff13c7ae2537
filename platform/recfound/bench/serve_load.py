"""Issue 14's load run of the Serve app, and the entry point of ``jobs/benchmark.py serve`` with --load / --abuse.

The model, registry and app are the serve benchmarks' (bench/serve.py: a fresh tiny GRM served from the shipped
serve/serve_config.yaml, one Model replica); the clients are closed-loop aiohttp clients over loopback
(bench/http_load.py), one kept-alive connection each, all on one event loop whose CPU time is reported.

Load: ``clients`` clients send embeddings / recommend / completions requests (``mix``) for ``warmup_s`` +
``duration_s``. The app's capacity is ``clients`` + the Model's max_ongoing_requests requests, enforced by the
Model's queue at the HTTP proxy (its max_queued_requests is ``clients``; the 503 comes from the proxy, before any
parsing). So this run is at most at capacity and every answer should be a 2xx. Then ``overload`` x capacity
clients for ``overload_s``: the requests beyond capacity must get fast 503s; a client backs off ``backoff_s`` after
a 503 as a well-behaved client does. The RSS of the Model replica and the HTTP proxy is sampled throughout: "flat
memory" is its end over its value after the warm-up.

The abuse run is bench/serve_abuse.py's; without --load or --abuse the comparison of bench/serve_overhead.py runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from recfound.bench import serve_overhead
from recfound.bench.common import Better, Report, Table, Target, fmt, percentile
from recfound.bench.http_load import Call, LoadRun, Outcome, closed_loop, run_async
from recfound.bench.serve import (
    ROUTES,
    Published,
    ServeBench,
    ServeLoadBench,
    free_port,
    model_deployment,
    publish_model,
    request_bodies,
    serve_config,
    served,
)
from recfound.bench.serve_abuse import run_abuse
from recfound.serving.model import MODEL_DEPLOYMENT

PROCESSES = {"Model replica": f":{MODEL_DEPLOYMENT}", "HTTP proxy": ""}
FAST_503_S = 1.0
FLAT_MEMORY_BOUND = 1.10


def run(bench: ServeLoadBench) -> Report:
    """The serve benchmark, or with --load / --abuse the load and abuse runs."""
    if not (bench.load or bench.abuse):
        return serve_overhead.run(ServeBench.model_validate(bench.model_dump(include=set(ServeBench.model_fields))))
    root = Path(bench.out_dir).resolve()
    published = publish_model(bench, root)
    config, capacity, overload_clients = _config(bench, published.registry)
    app = config["applications"][0]["name"]
    figures: dict[str, Any] = {"capacity": capacity} if bench.load else {}
    tables: list[Table] = []
    targets: list[Target] = []
    notes: list[str] = []
    timeout_s = _client_timeout_s(bench, config)
    with served(config, root / "serve.yaml") as url:
        processes = _serve_processes(app)
        if bench.abuse:
            run_abuse(bench, url, published, timeout_s, figures, tables, targets, notes)
        if bench.load:
            _load(
                bench,
                url,
                published,
                (capacity, overload_clients, timeout_s),
                processes,
                figures,
                tables,
                targets,
                notes,
            )
    name = "serve_" + "_".join(part for part, on in (("load", bench.load), ("abuse", bench.abuse)) if on)
    report = Report(name, bench.model_dump(mode="json") | {"serve_config": config}, {}, figures, tables)
    report.ratios = {k: figures.pop(k) for k in list(figures) if k.endswith(("_vs_idle", "_end_vs_start"))}
    report.notes = notes
    report.check(targets)
    return report


def _config(bench: ServeLoadBench, registry: str) -> tuple[dict[str, Any], int, int]:
    """The serve benchmark's config (the shipped one, one replica), and for --load the Model's queue that makes
    ``clients`` + its max_ongoing_requests the capacity; with the overload's clients."""
    config = serve_config(registry, free_port(), bench.batch_wait_s)
    model = model_deployment(config)
    if not bench.load:
        return config, 0, 0
    if bench.model_max_ongoing is not None:
        model["max_ongoing_requests"] = bench.model_max_ongoing
    capacity = int(model["max_ongoing_requests"]) + bench.clients
    overload_clients = math.ceil(bench.overload * capacity)
    model["max_queued_requests"] = bench.clients
    return config, capacity, overload_clients


def _client_timeout_s(bench: ServeLoadBench, config: dict[str, Any]) -> float:
    """The clients' timeout; by default past the app's own 504, so a timeout means the app never answered."""
    if bench.client_timeout_s is not None:
        return bench.client_timeout_s
    return float(config["applications"][0]["args"]["limits"]["request_timeout_s"]) + 30


def _serve_processes(app: str) -> dict[str, psutil.Process]:
    """The Model replica and the HTTP proxy of ``app`` among this driver's descendants (Ray started
    here puts its raylet, and so its workers, under this process), by the titles Ray gives its actors."""
    found: dict[str, psutil.Process] = {}
    for process in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            title = " ".join(process.cmdline())
            for role, suffix in PROCESSES.items():
                replica = f"ServeReplica:{app}{suffix}" if suffix else "ProxyActor"
                if role not in found and replica in title:
                    found[role] = process
    return found


def _usage(processes: dict[str, psutil.Process]) -> dict[str, dict[str, float]]:
    """RSS (MiB) and CPU seconds so far of each process; NaN once it is gone."""
    out = {}
    for role, process in processes.items():
        try:
            with process.oneshot():
                cpu = process.cpu_times()
                out[role] = {"rss_mib": process.memory_info().rss / 2**20, "cpu_s": cpu.user + cpu.system}
        except psutil.Error:
            out[role] = {"rss_mib": math.nan, "cpu_s": math.nan}
    return out


def _total_rss(usage: dict[str, dict[str, float]]) -> float:
    return sum(u["rss_mib"] for u in usage.values()) if usage else math.nan


def _summary(calls: Sequence[Call], since_s: float, window_s: float) -> dict[str, Any]:
    """Answers by outcome (every call), latency of the 2xx and 503 answers to requests sent after ``since_s``."""
    counts = {o.value: sum(c.outcome is o for c in calls) for o in Outcome}
    timed = [c for c in calls if c.started >= since_s]
    ok = [c.latency_s for c in timed if c.outcome is Outcome.OK]
    busy = [c.latency_s for c in timed if c.outcome is Outcome.OVERLOADED]
    return {
        "requests": len(calls),
        **counts,
        "504": sum(c.status == 504 for c in calls),
        "ok_per_s": len(ok) / window_s if window_s > 0 else math.nan,
        "ok_p50_ms": percentile(ok, 50) * 1e3,
        "ok_p99_ms": percentile(ok, 99) * 1e3,
        "ok_max_ms": max(ok, default=math.nan) * 1e3,
        "503_p50_ms": percentile(busy, 50) * 1e3,
        "503_p99_ms": percentile(busy, 99) * 1e3,
        "503_max_ms": max(busy, default=math.nan) * 1e3,
    }


def _phase(name: str, clients: int, run: LoadRun, since_s: float, window_s: float) -> dict[str, Any]:
    by_route = {route: _summary([c for c in run.calls if c.route == route], since_s, window_s) for route in ROUTES}
    return {
        "phase": name,
        "clients": clients,
        "wall_s": run.wall_s,
        "drain_s": run.drain_s,
        "client_cpu_s": run.client_cpu_s,
        "client_cpu_share": run.client_cpu_s / run.wall_s,
        "all": _summary(run.calls, since_s, window_s),
        "routes": by_route,
    }


def _load(
    bench: ServeLoadBench,
    url: str,
    published: Published,
    sizes: tuple[int, int, float],
    processes: dict[str, psutil.Process],
    figures: dict[str, Any],
    tables: list[Table],
    targets: list[Target],
    notes: list[str],
) -> None:
    capacity, overload_clients, timeout_s = sizes
    routes = request_bodies(bench, published)
    common = {"url": url, "routes": routes, "weights": bench.mix, "timeout_s": timeout_s}
    sample = lambda: _usage(processes)  # noqa: E731
    before = sample()
    load = run_async(
        closed_loop(
            clients=bench.clients,
            run_s=bench.warmup_s + bench.duration_s,
            ramp_s=min(bench.warmup_s, 5.0),
            sample=sample,
            marks={"start": bench.warmup_s, "end": bench.warmup_s + bench.duration_s},
            **common,
        )
    )
    drained = sample()
    overload = run_async(
        closed_loop(
            clients=overload_clients,
            run_s=bench.overload_s,
            ramp_s=min(bench.overload_s / 4, 5.0),
            backoff_s=bench.backoff_s,
            seed=1,
            sample=sample,
            **common,
        )
    )
    after = sample()
    phases = [
        _phase("load", bench.clients, load, bench.warmup_s, bench.duration_s),
        _phase("overload", overload_clients, overload, 0.0, bench.overload_s),
    ]
    start, end = load.marks.get("start", before), load.marks.get("end", drained)
    peak = {role: max(s[role]["rss_mib"] for _, s in load.samples + overload.samples) for role in processes}
    memory = {
        role: {
            "before_mib": before[role]["rss_mib"],
            "start_mib": start[role]["rss_mib"],
            "end_mib": end[role]["rss_mib"],
            "drained_mib": drained[role]["rss_mib"],
            "peak_mib": peak[role],
            "after_overload_mib": after[role]["rss_mib"],
            "cpu_s_load": drained[role]["cpu_s"] - before[role]["cpu_s"],
            "cpu_s_overload": after[role]["cpu_s"] - drained[role]["cpu_s"],
        }
        for role in processes
    }
    load_all, over_all = phases[0]["all"], phases[1]["all"]
    figures |= {
        "phases": phases,
        "memory": memory,
        "memory_samples": {
            phase: [{"t": t, **{role: u["rss_mib"] for role, u in s.items()}} for t, s in run.samples]
            for phase, run in (("load", load), ("overload", overload))
        },
        "load_5xx": load_all[Outcome.OVERLOADED.value] + load_all[Outcome.SERVER_ERROR.value],
        "load_connection_errors": load_all[Outcome.CONNECTION.value] + load_all[Outcome.TIMEOUT.value],
        "load_rss_end_vs_start": _total_rss(end) / _total_rss(start),
        "overload_503": over_all[Outcome.OVERLOADED.value],
        "overload_other_5xx": over_all[Outcome.SERVER_ERROR.value],
        "overload_timeouts": over_all[Outcome.TIMEOUT.value] + over_all[Outcome.CONNECTION.value],
        "overload_503_p99_s": over_all["503_p99_ms"] / 1e3,
    }
    tables += [_load_table(phases), _memory_table(memory, bench)]
    targets += [
        Target(f"load, {bench.clients:,} clients: 5xx answers", "load_5xx", 0, Better.LOWER),
        Target("load: connection errors + timeouts", "load_connection_errors", 0, Better.LOWER),
        Target(
            "load: Serve RSS (replicas + proxy) end / after warm-up",
            "load_rss_end_vs_start",
            FLAT_MEMORY_BOUND,
            Better.LOWER,
        ),
        Target(f"overload, {bench.overload:g}x capacity: 5xx other than 503", "overload_other_5xx", 0, Better.LOWER),
        Target("overload: timeouts + connection errors", "overload_timeouts", 0, Better.LOWER),
        Target("overload: 503 p99 latency (s)", "overload_503_p99_s", FAST_503_S, Better.LOWER),
    ]
    notes.append(
        f"Load: {bench.clients:,} closed-loop clients (mix embeddings/recommend/completions "
        f"{'/'.join(f'{m:g}' for m in bench.mix)}, completions {bench.max_tokens} greedy tokens) for "
        f"{bench.warmup_s:g} s warm-up + {bench.duration_s:g} s measured; capacity {capacity:,} requests, bound by the "
        "Model deployment's queue at the HTTP proxy (1 replica; the 503s come from the proxy); clients time out after "
        f"{timeout_s:g} s. Overload: {overload_clients:,} clients "
        f"({bench.overload:g}x) for {bench.overload_s:g} s, each waiting {bench.backoff_s:g} s x U(0.5, 1.5) after a "
        "503. Answer counts cover every request (warm-up included), latencies the requests sent after the warm-up. "
        f"The clients run on one event loop: {phases[0]['client_cpu_s']:.1f} s CPU in {phases[0]['wall_s']:.0f} s "
        f"under load ({phases[0]['client_cpu_share']:.0%} of a core), {phases[1]['client_cpu_s']:.1f} s in "
        f"{phases[1]['wall_s']:.0f} s overloaded ({phases[1]['client_cpu_share']:.0%}); the machine's "
        f"{os.cpu_count()} cores are shared by the clients, the proxy, the replicas and anything else running."
    )


def _load_table(phases: list[dict[str, Any]]) -> Table:
    rows = []
    for phase in phases:
        for route, s in [*phase["routes"].items(), ("all", phase["all"])]:
            rows.append(
                [
                    phase["phase"],
                    f"{phase['clients']:,}",
                    route,
                    f"{s['requests']:,}",
                    *(f"{s[o.value]:,}" for o in Outcome),
                    fmt(s["ok_per_s"]),
                    fmt(s["ok_p50_ms"]),
                    fmt(s["ok_p99_ms"]),
                    fmt(s["503_p50_ms"]),
                    fmt(s["503_p99_ms"]),
                ]
            )
    headers = ["run", "clients", "endpoint", "requests", *(o.value for o in Outcome)]
    headers += ["2xx/s", "2xx p50 ms", "2xx p99 ms", "503 p50 ms", "503 p99 ms"]
    return Table("Closed-loop clients over loopback HTTP: answers by status, latency", headers, rows)


def _memory_table(memory: dict[str, dict[str, float]], bench: ServeLoadBench) -> Table:
    rows = [
        [
            role,
            fmt(m["before_mib"]),
            fmt(m["start_mib"]),
            fmt(m["peak_mib"]),
            fmt(m["end_mib"]),
            fmt(m["end_mib"] / m["start_mib"]) + "x",
            fmt(m["drained_mib"]),
            fmt(m["after_overload_mib"]),
            fmt(m["cpu_s_load"]),
            fmt(m["cpu_s_overload"]),
        ]
        for role, m in memory.items()
    ]
    headers = ["process", "idle MiB", "after warm-up", "peak", "end of load", "end / warm-up", "drained"]
    headers += ["after overload", "CPU s load", "CPU s overload"]
    return Table(f"Serve processes' RSS (MiB) and CPU seconds ({bench.warmup_s:g} s warm-up)", headers, rows)
