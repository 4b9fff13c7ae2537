"""The main job end to end on the embedded default, by the same commands a user types (`make demo`).

build dataset -> train on Ray -> Model Merge -> publish (with item index) -> `serve run` -> one embeddings, one
completion and one recommend request through the HTTP API -> the merged model against popularity and BM25 on
the test split. Every step is the documented CLI, echoed first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from recfound.eval.report import headline  # noqa: E402
from recfound.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "demo"
BIN = Path(sys.executable).parent


def step(*args: str, env: dict[str, str] | None = None, echo: bool = True) -> str:
    """Run one job as a user would, its output shown as it comes (with ``echo``, else only its last line) so
    the job's progress lines and its own messages keep their order; return the last line (the job's result)."""
    print(f"\n$ {' '.join(args)}", flush=True)
    last = ""
    with subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as job:
        for line in job.stdout:
            if echo:
                print(line, end="", flush=True)
            last = line.strip() or last
    if not echo:
        print(last, flush=True)
    if job.returncode:
        raise SystemExit(f"demo stopped: `{' '.join(args)}` exited with {job.returncode}")
    return last


def serve_config(port: int) -> Path:
    """The shipped serve config, on ``port`` (8000 unless taken)."""
    config = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    path = Path(tempfile.mkdtemp()) / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port(preferred: int = 8000) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo stopped: serve run exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"demo stopped: {url} not healthy after {timeout_s:.0f} s")


def ask(url: str, data: Path) -> None:
    """One request per API, printed: what an application would see."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=60)
    emb = client.embeddings.create(model="recfound-q2i", input=["wireless noise cancelling headphones"])
    print(
        f"\nPOST /v1/embeddings (recfound-q2i): {len(emb.data[0].embedding)}-d vector, first values "
        f"{[round(v, 4) for v in emb.data[0].embedding[:4]]}"
    )
    task = data / "tasks" / "sentiment_analysis"
    prompt = pq.read_table(task / "test.parquet").slice(0, 1).to_pylist()[0]["prompt"]
    labels = sorted(set(pq.read_table(task / "train.parquet", columns=["response"]).column("response").to_pylist()))
    done = client.completions.create(
        model="recfound-sentiment_analysis", prompt=prompt, extra_body={"guided_choice": labels}
    )
    print(
        f"POST /v1/completions (recfound-sentiment_analysis, guided_choice of its {len(labels)} labels): "
        f"{done.choices[0].text!r}"
    )
    interactions = pq.read_table(data / "interactions.parquet").to_pylist()
    user = interactions[0]["user"]
    history = [row["item"] for row in sorted(interactions, key=lambda r: r["timestamp"]) if row["user"] == user][:5]
    reply = httpx.post(
        f"{url}/v1/recommend", json={"task": "u2i", "history": history, "k": 3, "exclude_history": True}, timeout=60
    )
    reply.raise_for_status()
    print(f"POST /v1/recommend (u2i, {len(history)} items of history): {json.dumps(reply.json(), indent=1)[:800]}")


def scoreboard(results: Path) -> None:
    """The headline metric and full-catalogue NDCG@10 of each embedding task: recfound next to the baselines."""
    systems = json.loads(results.read_text())["systems"]
    metrics = [
        (task, metric)
        for task in ("u2i", "q2i", "i2i")
        if task in systems["recfound"]
        for metric in (headline(task), "full.ndcg@10")
    ]
    print(f"\n{'test split':<22}" + "".join(f"{name:>12}" for name in systems))
    for task, metric in metrics:
        values = [systems[name].get(task, {}).get(metric) for name in systems]
        print(f"{task + ' ' + metric:<22}" + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in values))


def main() -> int:
    py = str(BIN / "python")
    data, merged, registry = RUNS / "data", RUNS / "merged", RUNS / "registry"
    step(py, "jobs/build_dataset.py", f"out={data}")
    name = datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    final = Path(step(py, "jobs/train.py", f"data={data}", f"storage_path={RUNS / 'train'}", f"name={name}"))
    # The last two complete checkpoints: where the late-converging tasks peak.
    kept = sorted(done.parent for done in final.parent.glob("checkpoint_*/checkpoint.json"))[-2:]
    step(py, "jobs/merge.py", "checkpoints=" + ",".join(map(str, kept)), "method=ties", f"out={merged}")
    step(py, "jobs/publish.py", f"model={merged}", f"data={data}", f"registry={registry}")

    port = free_port()
    config = serve_config(port)
    print(
        f"\n$ RECFOUND_REGISTRY={registry} {PROXY_CALLBACK_ENV}={PROXY_CALLBACK} "
        f"serve run serve/serve_config.yaml   (port {port})",
        flush=True,
    )
    env = os.environ | {"RECFOUND_REGISTRY": str(registry), PROXY_CALLBACK_ENV: PROXY_CALLBACK}
    server = subprocess.Popen(
        [str(BIN / "serve"), "run", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        ask(url, data)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    step(
        py,
        "jobs/evaluate.py",
        f"model={merged}",
        f"data={data}",
        f"out={RUNS / 'eval'}",
        "baselines=popularity,bm25",
        "protocols=pool,full",
        echo=False,
    )
    print(f"\ndemo done: dataset {data}, run {final}, merged {merged}, registry {registry}")
    scoreboard(RUNS / "eval" / "results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
