"""``jobs/benchmark.py serve --load --abuse`` at toy size (20 clients, seconds-long runs): the report's structure
and the invariants that do not depend on the machine's speed. At capacity every answer is a 2xx; at 2x capacity
the excess gets 503s and nothing else goes wrong; every abusive request gets its 413 or 400. No timing is
asserted (the figures are for the README's Performance section).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow

CLIENTS = 20
MAX_ONGOING = 4  # the Model's max_ongoing_requests here: with its max_queued_requests, what bounds capacity


def test_help_documents_load_and_abuse(benchmark: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(flag in out for flag in ("--load", "--abuse", "--clients", "--mix", "--overload", "--abuse-in-flight"))


def test_load_and_abuse(benchmark: ModuleType, tmp_path: Path) -> None:
    options = {
        "clients": CLIENTS,
        "model-max-ongoing": MAX_ONGOING,
        "warmup-s": 0.5,
        "duration-s": 2,
        "overload-s": 2,
        "backoff-s": 0.5,
        "max-tokens": 2,
        "abuse-repeats": 1,
        "abuse-in-flight": 2,
        "probe-clients": 2,
        "probe-s": 1,
        "abuse-rounds": 1,
        "users": 30,
        "items": 20,
        "out-dir": tmp_path / "serve",
        "out": tmp_path / "out.json",
    }
    argv = ["serve", "--load", "--abuse", *(x for key, value in options.items() for x in (f"--{key}", str(value)))]
    assert benchmark.main(argv) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    figures, ratios = report["figures"], report["ratios"]
    assert report["benchmark"] == "serve_load_abuse" and report["config"]["serve_config"]

    capacity = CLIENTS + MAX_ONGOING
    load, overload = figures["phases"]
    assert figures["capacity"] == capacity and (load["clients"], overload["clients"]) == (CLIENTS, 2 * capacity)
    for phase in (load, overload):
        assert set(phase["routes"]) == {"embeddings", "recommend", "completions"}
        for summary in [phase["all"], *phase["routes"].values()]:
            outcomes = ("2xx", "4xx", "503", "other 5xx", "connection error", "timeout")
            assert sum(summary[o] for o in outcomes) == summary["requests"]
        assert phase["client_cpu_s"] > 0 and phase["wall_s"] > 0
    assert all(s["2xx"] > 0 and s["requests"] == s["2xx"] for s in load["routes"].values()), load["routes"]
    assert figures["load_5xx"] == 0 and figures["load_connection_errors"] == 0
    assert figures["overload_503"] > 0, overload["all"]  # the excess was refused ...
    assert figures["overload_other_5xx"] == 0 and figures["overload_timeouts"] == 0  # ... and nothing else failed
    assert overload["all"]["4xx"] == 0 and math.isfinite(figures["overload_503_p99_s"])
    assert set(figures["memory"]) == {"Model replica", "HTTP proxy"}
    assert all(m["start_mib"] > 0 and m["end_mib"] > 0 for m in figures["memory"].values())

    alone = figures["abuse_alone"]
    assert len(alone) == 5
    assert all(a["statuses"] == [a["expected"]] for a in alone.values()), alone
    assert {a["expected"] for a in alone.values()} == {400, 413}
    assert figures["abuse_in_flight_wrong_answers"] == 0
    abused = [w for w in figures["abuse_windows"] if w["abused"]]
    assert abused and all(sum(a["count"] for a in w["abusers"]["answers"]) > 0 for w in abused)

    assert {"load_rss_end_vs_start", "abuse_p99_vs_idle", "abuse_p50_vs_idle"} <= set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    assert all(t["met"] is not None for t in report["targets"]), report["targets"]
    assert {"load_5xx", "overload_503_p99_s", "abuse_p99_vs_idle", "abuse_10_mib_body_s"} <= {
        t["key"] for t in report["targets"]
    }
