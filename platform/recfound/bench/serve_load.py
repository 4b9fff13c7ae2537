"""Issue 14's load and abuse runs of the Serve app: ``jobs/benchmark.py serve --load`` and ``serve --abuse``.

The model, registry and app are the serve benchmark's (bench/serve.py: a fresh tiny GRM served from the shipped
serve/serve_config.yaml, one Model replica); the clients are closed-loop aiohttp clients over loopback
(bench/http_load.py), one kept-alive connection each, all on one event loop whose CPU time is reported.

Load: ``clients`` clients send embeddings / recommend / completions requests (``mix``) for ``warmup_s`` +
``duration_s``. The app's capacity is ``clients`` + the Model's max_ongoing_requests requests, enforced by the
Model's queue at the HTTP proxy (its max_queued_requests is ``clients``; the 503 comes from the proxy, before any
parsing). So this run is at most at capacity and every answer should be a 2xx. Then ``overload`` x capacity
clients for ``overload_s``: the requests beyond capacity must get fast 503s; a client backs off ``backoff_s`` after
a 503 as a well-behaved client does. The RSS of the Model replica and the HTTP proxy is sampled throughout: "flat
memory" is its end over its value after the warm-up.

Abuse: each abusive request of http_load.ABUSES answered alone (status and latency), then the p99 latency of
normal embedding requests (``probe_clients`` closed-loop clients) idle and with ``abuse_in_flight`` abusive requests
kept in flight by a separate client process, in alternating rounds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
from pydantic import Field, field_validator

from recfound.bench import http_load
from recfound.bench.common import Better, Report, Table, Target, fmt, percentile
from recfound.bench.http_load import ABUSES, Call, LoadRun, Outcome, abusive_bodies, closed_loop, run_async, send
from recfound.bench.serve import (
    Published,
    ServeBench,
    _free_port,
    _model_deployment,
    _serve_config,
    publish_model,
    served,
)
from recfound.bench.serve import run as run_serve
from recfound.serving.model import MODEL_DEPLOYMENT

ROUTES = {"embeddings": "/v1/embeddings", "recommend": "/v1/recommend", "completions": "/v1/completions"}
RECOMMEND_TASK = "q2i"
PROCESSES = {"Model replica": f":{MODEL_DEPLOYMENT}", "HTTP proxy": ""}
FAST_503_S = 1.0
ABUSE_ANSWER_S = 1.0
ABUSE_P99_BOUND = 1.5
FLAT_MEMORY_BOUND = 1.10
BODIES_PER_ROUTE = 64


class ServeLoadBench(ServeBench):
    """Embeddings and completions through the Ray Serve app (HTTP on loopback) vs direct in-process batched
    calls on the same GRMEngine: throughput and p50/p99 latency at each concurrency, ratios, added p50.
    With --load: closed-loop clients at capacity, then at --overload x capacity (answers by status, latency,
    memory); with --abuse: oversized requests' answers and normal p99 while they are in flight (issue 14)."""

    load: bool = False
    """Run the load benchmark (clients at capacity, then overloaded) instead of the serve-vs-direct comparison."""
    abuse: bool = False
    """Run the abuse benchmark (oversized requests; normal p99 while they are in flight); with --load, both."""
    clients: int = Field(1000, ge=1)
    """Concurrent closed-loop clients of the load run; the app's capacity is this plus the Model's
    max_ongoing_requests (its max_queued_requests is set to this)."""
    mix: list[float] = [70, 20, 10]
    """Shares of embeddings, recommend and completions requests."""
    warmup_s: float = Field(10.0, ge=0)
    """Seconds of load before memory and latency are measured (clients start spread over min(warmup_s, 5))."""
    duration_s: float = Field(60.0, gt=0)
    """Measured seconds of the load run (requests then in flight are awaited)."""
    model_max_ongoing: int | None = Field(None, ge=1)
    """The Model deployment's max_ongoing_requests in the load runs; default: serve_config.yaml's."""
    overload: float = Field(2.0, gt=1)
    """Clients of the overload run, in multiples of the app's capacity."""
    overload_s: float = Field(30.0, gt=0)
    """Seconds of the overload run."""
    backoff_s: float = Field(5.0, ge=0)
    """After a 503 a client waits backoff_s x U(0.5, 1.5) before its next request."""
    client_timeout_s: float | None = Field(None, gt=0)
    """A request not answered within this many seconds counts as a timeout; default: the app's request_timeout_s
    + 30, so a timeout means the app did not answer, not even its 504."""
    abuse_repeats: int = Field(5, ge=1)
    """Times each abusive request is sent alone (median and max latency)."""
    abuse_in_flight: int = Field(20, ge=1)
    """Abusive requests kept in flight while normal embeddings latency is measured."""
    probe_clients: int = Field(4, ge=1)
    """Closed-loop clients of normal single-text embedding requests whose p99 is compared idle vs under abuse."""
    probe_s: float = Field(10.0, gt=0)
    """Seconds of each idle or abused probe window."""
    abuse_rounds: int = Field(2, ge=1)
    """Rounds of (idle, abused) probe windows, alternating which comes first."""

    @field_validator("mix")
    @classmethod
    def _three_shares(cls, mix: list[float]) -> list[float]:
        if len(mix) != len(ROUTES) or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"mix: {len(ROUTES)} non-negative shares ({', '.join(ROUTES)}), not all 0")
        return mix


def run(bench: ServeLoadBench) -> Report:
    """The serve benchmark, or with --load / --abuse the load and abuse runs."""
    if not (bench.load or bench.abuse):
        return run_serve(ServeBench.model_validate(bench.model_dump(include=set(ServeBench.model_fields))))
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
            _abuse(bench, url, published, timeout_s, figures, tables, targets, notes)
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
    config = _serve_config(registry, _free_port(), bench.batch_wait_s)
    model = _model_deployment(config)
    if not bench.load:
        return config, 0, 0
    if bench.model_max_ongoing is not None:
        model["max_ongoing_requests"] = bench.model_max_ongoing
    capacity = int(model["max_ongoing_requests"]) + bench.clients
    overload_clients = math.ceil(bench.overload * capacity)
    model["max_queued_requests"] = bench.clients
    return config, capacity, overload_clients


def _client_timeout_s(bench: ServeLoadBench, config: dict[str, Any]) -> float:
    if bench.client_timeout_s is not None:
        return bench.client_timeout_s
    return float(config["applications"][0]["args"]["limits"]["request_timeout_s"]) + 30


# --- memory of the Serve processes --------------------------------------------------------------------------------
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


# --- load -----------------------------------------------------------------------------------------------------------
def _bodies(bench: ServeBench, published: Published) -> dict[str, tuple[str, list[bytes]]]:
    encode = lambda body: json.dumps(body).encode()  # noqa: E731
    queries = published.queries(RECOMMEND_TASK, BODIES_PER_ROUTE)
    texts = published.queries(bench.embed_task, BODIES_PER_ROUTE)
    prompts = published.prompts(bench.generate_task, bench.max_tokens, BODIES_PER_ROUTE)
    return {
        "embeddings": (
            ROUTES["embeddings"],
            [encode({"model": f"recfound-{bench.embed_task}", "input": t}) for t in texts],
        ),
        "recommend": (ROUTES["recommend"], [encode({"task": RECOMMEND_TASK, "query": q, "k": 10}) for q in queries]),
        "completions": (
            ROUTES["completions"],
            [
                encode({"model": f"recfound-{bench.generate_task}", "prompt": p, "max_tokens": bench.max_tokens})
                for p in prompts
            ],
        ),
    }


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
    routes = _bodies(bench, published)
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


# --- abuse ----------------------------------------------------------------------------------------------------------
async def _alone(url: str, bodies: dict[str, http_load.Body], repeats: int) -> dict[str, list[Call]]:
    """Each abusive request ``repeats`` times, one at a time, each on a fresh connection."""
    out: dict[str, list[Call]] = {}
    for abuse in ABUSES:
        out[abuse.name] = []
        for _ in range(repeats):
            async with http_load.session(1, 60.0) as http:
                out[abuse.name].append(await send(http, url + abuse.path, bodies[abuse.name], abuse.name, 0.0, True))
    return out


@contextmanager
def _abusers(url: str, bench: ServeBench, in_flight: int) -> Iterator[dict[str, Any]]:
    """A client process keeping ``in_flight`` abusive requests in flight; yields once each has been answered,
    and fills the dict with its answer counts and CPU time when the block ends."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(Path(http_load.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    }
    command = [sys.executable, "-m", "recfound.bench.http_load", "abuse", "--url", url, "--in-flight", str(in_flight)]
    command += ["--embed-model", f"recfound-{bench.embed_task}", "--generate-model", f"recfound-{bench.generate_task}"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    result: dict[str, Any] = {}
    try:
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"the abuse client process did not start: {line!r}")
        yield result
        process.stdin.write("stop\n")
        process.stdin.flush()
        result |= json.loads(process.stdout.readline())
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _probe(url: str, bench: ServeLoadBench, bodies: list[bytes], seconds: float, timeout_s: float) -> LoadRun:
    routes = {"embeddings": (ROUTES["embeddings"], bodies)}
    return run_async(closed_loop(url, routes, [1.0], bench.probe_clients, seconds, timeout_s=timeout_s))


def _abuse(
    bench: ServeLoadBench,
    url: str,
    published: Published,
    timeout_s: float,
    figures: dict[str, Any],
    tables: list[Table],
    targets: list[Target],
    notes: list[str],
) -> None:
    bodies = abusive_bodies(f"recfound-{bench.embed_task}", f"recfound-{bench.generate_task}")
    alone = run_async(_alone(url, bodies, bench.abuse_repeats))
    rows, answers = [], {}
    for abuse in ABUSES:
        calls = alone[abuse.name]
        latencies = [c.latency_s for c in calls]
        right = all(c.status == abuse.status for c in calls)
        body = bodies[abuse.name]
        key = "abuse_" + "_".join(abuse.name.split(" (")[0].lower().split()) + "_s"
        answers[abuse.name] = {
            "path": abuse.path,
            "bytes": len(body) if isinstance(body, bytes) else 10 * http_load.MIB,
            "expected": abuse.status,
            "statuses": [c.status for c in calls],
            "codes": [c.code for c in calls],
            "median_s": sorted(latencies)[len(latencies) // 2],
            "max_s": max(latencies),
        }
        figures[key] = answers[abuse.name]["median_s"] if right else math.inf
        targets.append(Target(f"{abuse.name} → {abuse.status}, median seconds", key, ABUSE_ANSWER_S, Better.LOWER))
        rows.append(
            [
                abuse.name,
                abuse.path,
                f"{answers[abuse.name]['bytes']:,}",
                str(abuse.status),
                ", ".join(sorted({f"{c.status or c.outcome.value} {c.code}" for c in calls})),
                fmt(answers[abuse.name]["median_s"] * 1e3),
                fmt(answers[abuse.name]["max_s"] * 1e3),
            ]
        )
    tables.append(
        Table(
            f"Abusive requests, each sent alone {bench.abuse_repeats} times on a fresh connection",
            ["request", "path", "body bytes", "must get", "got (status code)", "median ms", "max ms"],
            rows,
        )
    )
    figures["abuse_alone"] = answers

    probe_bodies = _bodies(bench, published)["embeddings"][1]
    _probe(url, bench, probe_bodies, min(bench.probe_s, 2.0), timeout_s)  # warm-up
    windows: list[dict[str, Any]] = []
    for r in range(bench.abuse_rounds):
        for abused in (False, True) if r % 2 == 0 else (True, False):
            with _abusers(url, bench, bench.abuse_in_flight) if abused else _nothing() as abusers:
                run = _probe(url, bench, probe_bodies, bench.probe_s, timeout_s)
            latencies = [c.latency_s for c in run.calls if c.outcome is Outcome.OK]
            windows.append(
                {
                    "round": r,
                    "abused": abused,
                    "requests": len(run.calls),
                    "not_ok": sum(c.outcome is not Outcome.OK for c in run.calls),
                    "latencies_s": latencies,
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                    "abusers": abusers or None,
                }
            )
    pooled = {
        abused: [x for w in windows if w["abused"] is abused for x in w["latencies_s"]] for abused in (False, True)
    }
    p99 = {abused: percentile(pooled[abused], 99) * 1e3 for abused in pooled}
    p50 = {abused: percentile(pooled[abused], 50) * 1e3 for abused in pooled}
    figures["abuse_p99_vs_idle"] = p99[True] / p99[False]
    figures["abuse_p50_vs_idle"] = p50[True] / p50[False]
    figures["abuse_windows"] = windows
    wrong = sum(
        a["count"]
        for w in windows
        if w["abusers"]
        for a in w["abusers"]["answers"]
        if a["status"] != str(next(x.status for x in ABUSES if x.name == a["abuse"]))
    )
    figures["abuse_in_flight_wrong_answers"] = wrong
    rows = []
    for w in windows:
        a = w["abusers"] or {}
        answered = sum(x["count"] for x in a.get("answers", []))
        rows.append(
            [
                str(w["round"]),
                f"{bench.abuse_in_flight} abusive in flight" if w["abused"] else "idle",
                f"{w['requests']:,}",
                str(w["not_ok"]),
                fmt(w["p50_ms"]),
                fmt(w["p99_ms"]),
                f"{answered:,}" if a else "-",
                fmt(a["cpu_s"] / a["wall_s"]) if a else "-",
            ]
        )
    for abused in (False, True):
        rows.append(
            [
                "all",
                "abused" if abused else "idle",
                f"{len(pooled[abused]):,}",
                "",
                fmt(p50[abused]),
                fmt(p99[abused]),
                "",
                "",
            ]
        )
    tables.append(
        Table(
            f"Normal embeddings ({bench.probe_clients} closed-loop clients, {bench.probe_s:g} s windows) idle vs "
            f"with {bench.abuse_in_flight} abusive requests in flight: p99 {fmt(figures['abuse_p99_vs_idle'])}x idle",
            ["round", "window", "requests", "not 2xx", "p50 ms", "p99 ms", "abusive answers", "abuser CPU cores"],
            rows,
        )
    )
    targets.append(
        Target(
            f"normal embeddings p99 with {bench.abuse_in_flight} abusive requests in flight / idle",
            "abuse_p99_vs_idle",
            ABUSE_P99_BOUND,
            Better.LOWER,
        )
    )
    targets.append(
        Target(
            "abusive requests in flight answered other than 413/400", "abuse_in_flight_wrong_answers", 0, Better.LOWER
        )
    )
    notes.append(
        f"Abuse: the app's shipped limits (serve/serve_config.yaml). The {bench.abuse_in_flight} abusive requests in "
        "flight cycle through the first four of the table above, sent by a client process of their own, each client "
        "sending its next as soon as the last is answered; their CPU time (the abuser CPU cores column) is taken "
        "from the same cores as the Serve processes. p99 and p50 are pooled over the rounds' windows."
    )


@contextmanager
def _nothing() -> Iterator[dict[str, Any]]:
    yield {}
