"""report.md and its PNG plots from a results dict: systems x tasks per protocol, average rank, convergence.

Average rank follows the paper: rank the systems of a table on each (task, metric) column (1 = best, ties share
the mean rank) and average each system's ranks over all the table's columns. A system that cannot do a task
ranks last on it (tied with the others that cannot), so every rank averages over the same columns. The overall
rank uses each task's headline metric: the pool protocol for embedding tasks, the list protocol's NDCG for
candidate_ranking (the one every system can run), the paper's metric for the other generative ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from recfound.eval.convergence import plot_runs
from recfound.eval.metrics import GENERATIVE_METRICS, metric_name
from recfound.eval.protocols import LIST, LIST_GENERATIVE, LIST_PROTOCOLS, POOL_PROTOCOLS, list_metric_names
from recfound.tasks import ALL_TASKS, EMBEDDING_TASKS
from recfound.train.telemetry import plot_history

Systems = dict[str, dict[str, dict[str, float | None]]]
Column = tuple[str, str]
"""(task, metric key in results.json)."""

FULL_METRICS = ("recall@10", "recall@50", "ndcg@10", "mrr")


def headline(task: str) -> str:
    """The metric the paper reports for ``task`` (for a list-ranked task, its lists' NDCG)."""
    if task in EMBEDDING_TASKS:
        protocol = POOL_PROTOCOLS[task]
        return f"pool.{protocol.metric.value}@{protocol.k}"
    if task in LIST_PROTOCOLS:
        return list_metric_names(task)[0]
    return metric_name(GENERATIVE_METRICS[task][0])


@dataclass(frozen=True)
class Section:
    title: str
    columns: list[Column]
    image: str


def _present(systems: Systems, columns: Sequence[Column]) -> list[Column]:
    return [(t, m) for t, m in columns if any(s.get(t, {}).get(m) is not None for s in systems.values())]


def sections(systems: Systems) -> list[Section]:
    """The per-protocol tables that have any value, columns in task-id order."""
    tasks = [t for t in ALL_TASKS if any(t in s for s in systems.values())]
    pool = [(t, headline(t)) for t in tasks if t in EMBEDDING_TASKS]
    full = [(t, f"full.{m}") for t in tasks if t in EMBEDDING_TASKS for m in FULL_METRICS]
    generative = [(t, metric_name(m)) for t in tasks if t not in EMBEDDING_TASKS for m in GENERATIVE_METRICS[t]]
    lists = [
        (t, m) for t in tasks if t in LIST_PROTOCOLS for p in (LIST, LIST_GENERATIVE) for m in list_metric_names(t, p)
    ]
    found = [
        Section("Embedding, paper protocol (1 positive + sampled same-category negatives)", pool, "pool.png"),
        Section("Embedding, full catalogue (user's train items and the i2i anchor excluded)", full, "full.png"),
        Section("Generative (greedy decoding)", generative, "generative.png"),
        Section(
            "Candidate lists (the item bought + 19 sampled items the user never bought; list: u2i scores, the GRMs' "
            "embeddings; list_generative: the GRMs' P(yes))",
            lists,
            "lists.png",
        ),
    ]
    found = [Section(s.title, _present(systems, s.columns), s.image) for s in found]
    return [s for s in found if s.columns]


def _frame(systems: Systems, columns: Sequence[Column]) -> pd.DataFrame:
    """systems x columns, nan where a system has no value."""
    return pd.DataFrame(
        [[math.nan if (v := systems[s].get(t, {}).get(m)) is None else v for t, m in columns] for s in systems],
        index=list(systems),
        columns=pd.MultiIndex.from_tuples(columns),
        dtype=float,
    )


def average_ranks(systems: Systems, columns: Sequence[Column]) -> pd.DataFrame:
    """Per system: mean rank over the columns (higher values rank first, no value ranks last) and how many of
    the columns it has a value in."""
    frame = _frame(systems, columns)
    ranks = frame.rank(axis=0, ascending=False, method="average", na_option="bottom")
    return pd.DataFrame({"rank": ranks.mean(axis=1), "columns": frame.notna().sum(axis=1)})


def _covering(systems: Systems, columns: Sequence[Column]) -> Systems:
    """The systems with a value in any of the columns: a table leaves out systems that cannot do its tasks."""
    return {name: s for name, s in systems.items() if any(s.get(t, {}).get(m) is not None for t, m in columns)}


def _fmt(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _int(value: int | None) -> str:
    return "–" if value is None else str(value)


def _label(column: Column) -> str:
    task, metric = column
    return f"{task} {metric.split('.', 1)[-1]}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def section_table(systems: Systems, section: Section) -> str:
    """systems x columns, the mean over all columns (– unless the system has every one) and the average rank
    within this section."""
    systems = _covering(systems, section.columns)
    frame = _frame(systems, section.columns)
    ranks = average_ranks(systems, section.columns)
    rows = [
        [
            name,
            *(_fmt(v) for v in frame.loc[name]),
            _fmt(frame.loc[name].mean(skipna=False)),
            _fmt(ranks.loc[name, "rank"]),
        ]
        for name in systems
    ]
    return markdown_table(["system", *map(_label, section.columns), "mean", "avg rank"], rows)


def rank_table(systems: Systems) -> str:
    """The overall average rank over every task's headline metric, best first."""
    tasks = [t for t in ALL_TASKS if any(t in s for s in systems.values())]
    ranks = average_ranks(systems, _present(systems, [(t, headline(t)) for t in tasks])).sort_values("rank")
    return markdown_table(
        ["system", "avg rank", "tasks done"],
        [[name, _fmt(row["rank"]), str(int(row["columns"]))] for name, row in ranks.iterrows()],
    )


def tables(systems: Systems) -> str:
    """Every systems table as markdown: what the job prints and report.md opens with."""
    parts = [f"### {s.title}\n\n{section_table(systems, s)}" for s in sections(systems)]
    overall = "### Average rank (headline metric per task; a task a system cannot do ranks it last)"
    return "\n\n".join([*parts, f"{overall}\n\n{rank_table(systems)}"])


def convergence_table(summary: dict[str, Any]) -> str:
    """One run: per task initial and final loss, their ratio, the step that reached the target and the rows
    trained on (a task S2Sched kept at its floor shows here as a few rows)."""
    rows = [
        [task, _fmt(c["initial"]), _fmt(c["final"]), _fmt(c["ratio"]), _int(c["step"]), _int(c.get("rows"))]
        for task, c in summary["tasks"].items()
    ]
    headers = ["task", "initial loss", "final loss", "final / initial", "step to target", "rows trained"]
    table = markdown_table(headers, rows)
    return f"{table}\n\n{_balance_line(summary['balance'])}"


def _balance_line(b: dict[str, Any]) -> str:
    return (
        f"{b['converged']}/{b['total']} tasks reached the target; steps {_int(b['first'])} to "
        f"{_int(b['last'])} (spread {_int(b['spread'])}); final/initial loss {_fmt(b['mean_ratio'])} "
        f"± {_fmt(b['ratio_std'])} across tasks"
    )


def compare_convergence_tables(runs: dict[str, dict[str, Any]]) -> str:
    """Several runs: task balance per run, then each task's step to target per run."""
    balance = markdown_table(
        ["run", "converged", "first", "last", "spread", "mean final/initial", "std final/initial"],
        [
            [
                label,
                f"{b['converged']}/{b['total']}",
                _int(b["first"]),
                _int(b["last"]),
                _int(b["spread"]),
                _fmt(b["mean_ratio"]),
                _fmt(b["ratio_std"]),
            ]
            for label, b in ((label, s["balance"]) for label, s in runs.items())
        ],
    )
    tasks = [t for t in ALL_TASKS if any(t in s["tasks"] for s in runs.values())]
    steps = markdown_table(
        ["task", *runs],
        [[t, *(_int(s["tasks"].get(t, {}).get("step")) for s in runs.values())] for t in tasks],
    )
    return f"{balance}\n\nSteps to target per task:\n\n{steps}"


def plot_section(systems: Systems, section: Section, path: Path) -> Path:
    """Grouped bars: one group per (task, metric), one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _frame(_covering(systems, section.columns), section.columns).fillna(0.0)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.25 * frame.size + 2), 4.5))
    width = 0.8 / max(1, len(frame.index))
    for i, name in enumerate(frame.index):
        ax.bar([c + i * width for c in range(len(section.columns))], frame.loc[name].to_numpy(), width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(section.columns))])
    ax.set_xticklabels([_label(c) for c in section.columns], rotation=30, ha="right", fontsize=7)
    ax.set(title=section.title, ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(
    results: dict[str, Any], out: Path, histories: dict[str, list[dict]], compare: bool = False
) -> list[Path]:
    """report.md plus one bar chart per protocol and, when training histories are given, loss/weight curves
    (one run) or the normalised-loss comparison and each run's curves (compare mode). Returns the files."""
    systems: Systems = results["systems"]
    written = [plot_section(systems, s, out / s.image) for s in sections(systems)]
    lines = ["# RecFound evaluation", ""]
    if compare:
        runs = ", ".join(f"`{label}` ({run.get('model')})" for label, run in results["runs"].items())
        lines += [f"Runs: {runs}", ""]
    else:
        lines += [
            f"Model `{results['model']}` ({results['model_kind']}) on `{results['data']}`, split "
            f"{results['split']}, seed {results['seed']}.",
            "",
        ]
        lines += [f"Evaluated rows per task: {', '.join(f'{t} {n}' for t, n in results['queries'].items())}.", ""]
        if results.get("lists"):
            lists = ", ".join(f"{t} {n}" for t, n in results["lists"].items())
            lines += [f"Candidate lists ranked per task: {lists}.", ""]
        cpu = results["cpu_seconds"]
        timing = ", ".join(f"{name} {wall} / {cpu[name]}" for name, wall in results["seconds"].items())
        lines += [f"Seconds per system (wall / CPU): {timing}.", ""]
        lines += [f"Skipped {name}: {why}" for name, why in results["skipped"].items()]
    lines += [tables(systems), ""]
    lines += [f"![{s.title}]({s.image})" for s in sections(systems)]
    convergence = results.get("convergence")
    if convergence:
        lines += ["", "## Training convergence", ""]
        if compare:
            lines += [compare_convergence_tables(convergence)]
            written.append(plot_runs(histories, out / "convergence.png"))
            lines += ["", "![normalised loss per run](convergence.png)"]
            for label, history in histories.items():
                run_dir = out / label.replace("/", "_")
                run_dir.mkdir(exist_ok=True)
                written += plot_history(history, run_dir)
                name = run_dir.name
                lines += [f"![{label} losses]({name}/losses.png) ![{label} weights]({name}/weights.png)"]
        else:
            lines += [convergence_table(convergence)]
            target = convergence["target"]
            lines += ["", f"Target: {target:g} x initial loss, trailing mean over {convergence['window']} steps."]
            written += plot_history(next(iter(histories.values())), out) if histories else []
            lines += ["", "![per-task loss](losses.png) ![S2Sched weights](weights.png)"] if histories else []
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return [out / "report.md", *written]
