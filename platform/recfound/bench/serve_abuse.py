"""Issue 14's abuse run of the Serve app (``jobs/benchmark.py serve --abuse``): how it answers oversized requests
and what they cost normal requests.

Each abusive request of http_load.ABUSES is answered alone (status and latency); then the p99 latency of normal
embedding requests (``probe_clients`` closed-loop clients) is taken idle and with ``abuse_in_flight`` abusive
requests kept in flight by a separate client process, in alternating rounds. The app is bench/serve.py's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recfound.bench import http_load
from recfound.bench.common import Better, Table, Target, fmt, percentile
from recfound.bench.http_load import ABUSES, Call, LoadRun, Outcome, abusive_bodies, closed_loop, run_async, send
from recfound.bench.serve import ROUTES, Published, ServeBench, ServeLoadBench, request_bodies

ABUSE_ANSWER_S = 1.0
ABUSE_P99_BOUND = 1.5

Part = tuple[dict[str, Any], Table, list[Target]]
"""What one half of the abuse run found: its figures, its table and the targets it sets."""


def run_abuse(
    bench: ServeLoadBench,
    url: str,
    published: Published,
    timeout_s: float,
    figures: dict[str, Any],
    tables: list[Table],
    targets: list[Target],
    notes: list[str],
) -> None:
    """Both halves of the abuse run, each adding its figures, table and targets; then the note on how to read them."""
    for found, table, checks in (_answered_alone(bench, url), _latency_under_abuse(bench, url, published, timeout_s)):
        figures |= found
        tables.append(table)
        targets += checks
    notes.append(
        f"Abuse: the app's shipped limits (serve/serve_config.yaml). The {bench.abuse_in_flight} abusive requests in "
        "flight cycle through the first four of the table above, sent by a client process of their own, each client "
        "sending its next as soon as the last is answered; their CPU time (the abuser CPU cores column) is taken "
        "from the same cores as the Serve processes. p99 and p50 are pooled over the rounds' windows."
    )


def _answered_alone(bench: ServeLoadBench, url: str) -> Part:
    """Each abusive request's answer when it is the only request: the status it must get, and how fast."""
    found: dict[str, Any] = {}
    checks: list[Target] = []
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
        found[key] = answers[abuse.name]["median_s"] if right else math.inf
        checks.append(Target(f"{abuse.name} → {abuse.status}, median seconds", key, ABUSE_ANSWER_S, Better.LOWER))
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
    found["abuse_alone"] = answers
    table = Table(
        f"Abusive requests, each sent alone {bench.abuse_repeats} times on a fresh connection",
        ["request", "path", "body bytes", "must get", "got (status code)", "median ms", "max ms"],
        rows,
    )
    return found, table, checks


def _latency_under_abuse(bench: ServeLoadBench, url: str, published: Published, timeout_s: float) -> Part:
    """Normal embeddings' p50/p99 in idle and abused windows, alternating which comes first in each round so that
    a drift of the machine over time does not read as the abuse's cost."""
    found: dict[str, Any] = {}
    probe_bodies = request_bodies(bench, published)["embeddings"][1]
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
    found["abuse_p99_vs_idle"] = p99[True] / p99[False]
    found["abuse_p50_vs_idle"] = p50[True] / p50[False]
    found["abuse_windows"] = windows
    wrong = sum(
        a["count"]
        for w in windows
        if w["abusers"]
        for a in w["abusers"]["answers"]
        if a["status"] != str(next(x.status for x in ABUSES if x.name == a["abuse"]))
    )
    found["abuse_in_flight_wrong_answers"] = wrong
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
    table = Table(
        f"Normal embeddings ({bench.probe_clients} closed-loop clients, {bench.probe_s:g} s windows) idle vs "
        f"with {bench.abuse_in_flight} abusive requests in flight: p99 {fmt(found['abuse_p99_vs_idle'])}x idle",
        ["round", "window", "requests", "not 2xx", "p50 ms", "p99 ms", "abusive answers", "abuser CPU cores"],
        rows,
    )
    checks = [
        Target(
            f"normal embeddings p99 with {bench.abuse_in_flight} abusive requests in flight / idle",
            "abuse_p99_vs_idle",
            ABUSE_P99_BOUND,
            Better.LOWER,
        ),
        Target(
            "abusive requests in flight answered other than 413/400", "abuse_in_flight_wrong_answers", 0, Better.LOWER
        ),
    ]
    return found, table, checks


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


@contextmanager
def _nothing() -> Iterator[dict[str, Any]]:
    yield {}
