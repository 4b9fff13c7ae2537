"""Publish a merged model to the registry (with its item index) and optionally roll a running Serve app to it.

python jobs/publish.py model=<merged dir> data=<dataset dir> registry=<dir or url> [serve=<ray address>]
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.config import Config, InputURL, cli  # noqa: E402

DEFAULT_ENGINE = "recfound.serving.engine:GRMEngine"
EXPORT_ENGINE = "recfound.serving.engine:ExportEngine"
USAGE = """
    Publish a merged model (or an embedding export of one, jobs/export.py) as the registry's next version vN,
    then point `latest` at it.

    python jobs/publish.py model=<merged dir> data=<dataset dir> registry=<dir or url> [serve=<ray address>]

    The merged directory's manifest.json (written by the merge job) lists the SHA-256 of every file; a mismatch
    aborts the publish and leaves `latest` where it was. The item index embeds data's items.parquet with the new
    model. With serve=, the running Serve app is switched to vN in place, with no dropped requests.
"""


class PublishConfig(Config):
    model: InputURL
    """Merged model directory (any fsspec URL) with the merge job's manifest.json."""
    data: InputURL
    """Built dataset directory: its items.parquet is the catalogue to index, its manifest the text templates."""
    registry: str
    """Registry root: a local directory or an fsspec URL (s3://, gs://, memory://)."""
    serve: str | None = None
    """Ray address of the cluster running the Serve app (auto, host:6379, ray://head:10001); when set, the app's
    Model deployment is reconfigured to the new version in place (zero downtime) once it is published."""
    app: str = "recfound"
    """Name of the Serve application to roll (the `name` in serve_config.yaml)."""
    engine: str | None = None
    """Engine factory recorded in the version ('module:callable', called with the version directory); unset: the
    GRM engine for a merged or adapted model, the export engine for an embedding export (jobs/export.py)."""
    batch_size: int = 64
    """Items embedded per engine call while building the index; larger is faster and needs more memory."""


def default_engine(model: str) -> str:
    """The engine that loads ``model``: an export (its manifest's kind) has its own."""
    from recfound.artifacts import EXPORT_KIND, MANIFEST
    from recfound.io import exists, read_json

    manifest = f"{model.rstrip('/')}/{MANIFEST}"
    kind = read_json(manifest).get("kind") if exists(manifest) else None
    return EXPORT_ENGINE if kind == EXPORT_KIND else DEFAULT_ENGINE


def main(argv: list[str] | None = None) -> str:
    cfg = cli(PublishConfig, argv, USAGE)
    from recfound.io import read_json
    from recfound.serving.engine import ENGINE_KEY
    from recfound.serving.index import build_item_index, text_meta
    from recfound.serving.publish import publish
    from recfound.tasks import DATASET_MANIFEST, ITEMS

    dataset = read_json(f"{cfg.data}/{DATASET_MANIFEST}")
    meta = {ENGINE_KEY: cfg.engine or default_engine(cfg.model), **text_meta(dataset)}
    build = partial(build_item_index, items_url=f"{cfg.data}/{ITEMS}", batch_size=cfg.batch_size)
    version = publish(cfg.model, cfg.registry, build, meta)
    print(version, flush=True)
    if cfg.serve:
        import ray

        from recfound.serving.app import roll_out

        ray.init(address=cfg.serve, log_to_driver=False)
        roll_out(version, cfg.app)
        print(f"serving {version}", flush=True)
    return version


if __name__ == "__main__":
    main()
