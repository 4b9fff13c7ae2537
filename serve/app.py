"""Serve entry point: ``RECFOUND_REGISTRY=<dir or url> serve run serve/serve_config.yaml``, with
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=recfound.serving.proxy:middlewares`` where Ray starts (serving/proxy.py).

``app`` is the application builder (it takes the config's ``args``); the app itself lives in
``recfound.serving.app`` so it is importable and testable without this file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from recfound.serving.app import build_app  # noqa: E402

app = build_app
