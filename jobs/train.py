"""Train a TMoLE recommendation foundation model on Ray (Ray Train TorchTrainer + the S2Sched actor).

Runs the same way on a laptop and on a cluster:
    python jobs/train.py                                  # embedded default: synthetic shop, tiny model, 2 CPU workers
    ray job submit --working-dir . -- python jobs/train.py --config configs/smollm2.yaml data=s3://bucket/ds
Under `ray job submit` it joins that cluster and ships the recfound package to every worker (runtime_env
py_modules), so worker nodes need the dependencies but not this project.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.train.console import quiet_ray_console  # noqa: E402

quiet_ray_console()  # before Ray is imported: it reads its log filter from the environment once
from recfound.config import cli  # noqa: E402
from recfound.train.config import TrainConfig  # noqa: E402
from recfound.train.run import RunError, run  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
USAGE = """
    python jobs/train.py [--config configs/<name>.yaml] [key=value ...]   (default config: configs/tiny.yaml)
    python jobs/train.py data=<dataset dir> storage_path=<dir or url> name=<run> max_steps=<n>
                         [num_workers=<n>] [scheduler.mode=uniform|size_proportional|s2sched]

    Re-running with an existing name resumes that run from its latest checkpoint. Prints the final
    checkpoint's path as the last line; that directory holds adapter/, s2sched.json, metrics.jsonl,
    losses.png and weights.png.
"""


def main(argv: list[str] | None = None) -> int:
    cfg = cli(TrainConfig, argv, USAGE, default_config=str(DEFAULT_CONFIG))
    try:
        path = run(cfg)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        import ray

        # Disconnect first: worker and actor log lines relayed after the path would no longer make it the last line.
        ray.shutdown()
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
