"""GRM: one TMoLE-adapted causal LM that embeds (bidirectional by default, mean-pooled) and generates (causal).

The two modes differ in the attention mask and the read-out: embedding runs the decoder with a padding-only
(bidirectional) mask, or causally with ``embedding_attention=causal``, and pools the last hidden states over the
text tokens; generation runs it causally and reads logits. Position ids follow the attention mask, so left and right
padding give the same results.

Early exit (M6-Rec's on-device trick): an embedding can be read after the first k decoder layers instead of all of
them (``embed(..., exit_layer=k)``). Only those k layers run, then the backbone's final norm and the same mean
pooling, so the cost is about k/L of a full pass; training keeps such exits good with an InfoNCE term per exit
(``LossConfig.exit_layers``), which reads every exit off the one forward that also gives the last layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from recfound.model.backbone import BackboneConfig, EmbeddingAttention
from recfound.model.formats import IGNORE_INDEX, encode_generative, encode_prompt, greedy_decoding
from recfound.model.pretrained import load_backbone
from recfound.model.tmole import TMoLEConfig, TMoLEModel, read_adapter_config
from recfound.tasks import Mode

ArrayLike = torch.Tensor | np.ndarray


class GRM(nn.Module):
    """Generative-representational model: ``embed``, ``lm_loss`` and ``generate`` over one TMoLE tuner."""

    def __init__(self, tuner: TMoLEModel, tokenizer: PreTrainedTokenizerBase, backbone: BackboneConfig) -> None:
        super().__init__()
        self.tuner = tuner
        self.tokenizer = tokenizer
        self.backbone = backbone

    @classmethod
    def build(cls, backbone: BackboneConfig, tmole: TMoLEConfig | None = None) -> GRM:
        """Load the backbone and wrap it with a fresh adapter (B = 0, so it starts as the backbone)."""
        model, tokenizer = load_backbone(backbone)
        config = dataclasses.replace(tmole or TMoLEConfig(), backbone=backbone.model_dump())
        tuner = TMoLEModel(model, config)
        if backbone.gradient_checkpointing:
            tuner.enable_gradient_checkpointing()
        return cls(tuner, tokenizer, backbone)

    @classmethod
    def from_pretrained(cls, path: str, backbone: BackboneConfig | None = None) -> GRM:
        """Rebuild from a saved adapter; ``backbone`` overrides the recorded one (e.g. a new local path)."""
        config = read_adapter_config(path)
        if backbone is None:
            if config.backbone is None:
                raise ValueError(f"{path}: the adapter does not record its backbone; pass backbone=")
            backbone = BackboneConfig.model_validate(config.backbone)
        grm = cls.build(backbone, config)
        grm.tuner.load_pretrained(path)
        return grm

    def save_pretrained(self, path: str) -> None:
        self.tuner.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self.tuner.task_table.weight.device

    def task_ids(self, tasks: Sequence[str]) -> torch.Tensor:
        """Task names -> (B,) ids of this adapter's task table."""
        return torch.tensor([self.tuner.task_id(task) for task in tasks], device=self.device)

    # --- forward passes ---------------------------------------------------------------------------------------
    def hidden_states(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, task_ids: torch.Tensor, mode: Mode
    ) -> torch.Tensor:
        """(B, T, H) last hidden states: bidirectional attention for EMBEDDING (unless the backbone's
        ``embedding_attention`` is causal), causal for GENERATIVE."""
        decoder = self.tuner.model.base_model
        embeds, attention, width = self._inputs(self._tensor(input_ids), self._tensor(attention_mask), task_ids)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        mask: Any = attention
        extra: dict[str, Any] = {}
        if mode is Mode.EMBEDDING and self.backbone.embedding_attention is EmbeddingAttention.BIDIRECTIONAL:
            # A materialised padding-only mask is used as-is by sdpa/eager/flex; is_causal=False covers
            # flash-attention, which takes a 2D mask and its causality from this flag.
            mask = create_bidirectional_mask(
                config=decoder.config, inputs_embeds=embeds, attention_mask=attention, allow_is_bidirectional_skip=False
            )
            extra["is_causal"] = False
        with self.tuner.route(task_ids, mode):
            out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
        return out.last_hidden_state[:, width:]

    @property
    def num_layers(self) -> int:
        """Decoder layers of the backbone: the deepest exit, the one ``embed`` reads by default."""
        return len(self.tuner.model.base_model.layers)

    def check_exits(self, layers: Sequence[int], key: str = "exit_layer") -> None:
        """Refuse exit layers the backbone does not have; the message names the config ``key``."""
        wrong = [k for k in layers if not 1 <= k <= self.num_layers]
        if wrong:
            raise ValueError(
                f"{key}={', '.join(map(str, wrong))}: the backbone has {self.num_layers} decoder layers, so an exit "
                f"is 1-{self.num_layers} (the output of that many layers)"
            )

    def exit_states(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, task_ids: torch.Tensor, layers: Sequence[int]
    ) -> list[torch.Tensor]:
        """(B, T, H) embedding hidden states after each of the first ``layers`` decoder layers, final norm applied
        (as the last layer's output has it), from one pass that stops at the deepest: the layers above never run.

        The decoder's own loop, unrolled: same rotary embeddings, the same mask for every layer as
        ``hidden_states`` hands the decoder (padding-only, or causal with ``embedding_attention=causal``), and the
        same routing, so ``layers=[num_layers]`` is exactly ``hidden_states`` in EMBEDDING mode. Gradient
        checkpointing still applies (it lives in each layer's call).
        """
        self.check_exits(layers)
        decoder = self.tuner.model.base_model
        embeds, attention, width = self._inputs(self._tensor(input_ids), self._tensor(attention_mask), task_ids)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        bidirectional = self.backbone.embedding_attention is EmbeddingAttention.BIDIRECTIONAL
        options = {"config": decoder.config, "inputs_embeds": embeds, "attention_mask": attention}
        if bidirectional:
            mask = create_bidirectional_mask(**options, allow_is_bidirectional_skip=False)
        else:
            mask = create_causal_mask(**options, cache=None, position_ids=positions, allow_is_causal_skip=False)
        hidden, rotary = embeds, decoder.rotary_emb(embeds, positions)
        states: dict[int, torch.Tensor] = {}
        with self.tuner.route(task_ids, Mode.EMBEDDING):
            for depth, layer in enumerate(decoder.layers[: max(layers)], start=1):
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=rotary,
                    position_ids=positions,
                    is_causal=not bidirectional,
                )
                if depth in layers:
                    states[depth] = decoder.norm(hidden)[:, width:]
        return [states[k] for k in layers]

    def _inputs(
        self, ids: torch.Tensor, attention: torch.Tensor, task_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token embeddings with the rows' soft prompts in front (when a task has one), the attention mask to match,
        and the prefix width. Positions follow the mask, so the tokens sit after the prompt as in training."""
        embeds = self.tuner.model.get_input_embeddings()(ids)
        prefix = self.tuner.soft_prompt(task_ids)
        if prefix is None:
            return embeds, attention, 0
        vectors, mask = prefix
        return torch.cat([vectors.to(embeds), embeds], 1), torch.cat([mask.to(attention), attention], 1), mask.shape[1]

    def embed(
        self, batch: Mapping[str, ArrayLike], task_ids: torch.Tensor, exit_layer: int | None = None
    ) -> torch.Tensor:
        """(B, D) L2-normalised float32 mean of the text tokens' hidden states (``encode_embedding`` batch).

        ``exit_layer=k``: read after the first k decoder layers (``exit_states``), the rest skipped; None or the
        backbone's depth: the full model."""
        if exit_layer is None or exit_layer == self.num_layers:
            hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], task_ids, Mode.EMBEDDING)
            return self._pool(hidden, batch["text_mask"])
        return self.embed_exits(batch, task_ids, [exit_layer])[0]

    def embed_exits(
        self, batch: Mapping[str, ArrayLike], task_ids: torch.Tensor, layers: Sequence[int]
    ) -> torch.Tensor:
        """(len(layers), B, D): ``embed`` at each exit layer, all from one pass through the deepest of them."""
        states = self.exit_states(batch["input_ids"], batch["attention_mask"], task_ids, layers)
        return torch.stack([self._pool(hidden, batch["text_mask"]) for hidden in states])

    def _pool(self, hidden: torch.Tensor, text_mask: ArrayLike) -> torch.Tensor:
        weights = self._tensor(text_mask).to(torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def lm_loss(self, batch: Mapping[str, ArrayLike], task_ids: torch.Tensor) -> torch.Tensor:
        """Token-mean cross-entropy of the response tokens (``encode_generative`` batch, right padded)."""
        losses, _ = self.lm_token_losses(batch, task_ids)
        return losses.sum() / max(1, losses.numel())

    def lm_token_losses(
        self, batch: Mapping[str, ArrayLike], task_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of every response token, the batch row it belongs to): training sums them per task.

        Logits are computed only where a label exists: prompts dominate the length and the vocabulary is large.
        """
        hidden = self.hidden_states(batch["input_ids"], batch["attention_mask"], task_ids, Mode.GENERATIVE)
        targets = self._tensor(batch["labels"])[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.tuner.model.get_output_embeddings()(hidden[:, :-1][keep])
        rows = keep.nonzero()[:, 0]
        return F.cross_entropy(logits.float(), targets[keep], reduction="none"), rows

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], task: str, max_new_tokens: int = 64, **generate_kwargs: Any
    ) -> list[str]:
        """Responses to ``prompts`` under ``task``'s routing; greedy unless ``generate_kwargs`` say otherwise."""
        batch = encode_prompt(self.tokenizer, prompts, max_len=self.backbone.max_generative_len)
        ids, attention = self._tensor(batch["input_ids"]), self._tensor(batch["attention_mask"])
        options = greedy_decoding(self.tokenizer, max_new_tokens) | generate_kwargs
        task_ids = self.task_ids([task] * len(prompts))
        embeds, attention, width = self._inputs(ids, attention, task_ids)
        # With a soft prompt the input is embeddings, and transformers then returns the new tokens only.
        inputs = {"inputs_embeds": embeds} if width else {"input_ids": ids}
        out = self.tuner.generate(**inputs, attention_mask=attention, task_ids=task_ids, **options)
        return self.tokenizer.batch_decode(out if width else out[:, ids.shape[1] :], skip_special_tokens=True)

    @torch.no_grad()
    def choice_scores(
        self, prompts: Sequence[str], choices: Sequence[str], task: str, batch_size: int = 32
    ) -> torch.Tensor:
        """(prompts, choices) mean log-likelihood per token of each choice as the whole response (eos included).

        Per-token means, as lm-eval-harness normalises: a sum would favour the shortest choice. Each prompt runs
        through the decoder once and every choice continues from its cached keys and values, so k choices cost one
        prompt pass plus k passes of a few tokens instead of k full passes (sequential recommendation has 20
        options). ``batch_size`` prompts per pass, so memory does not grow with a request's size. A prompt whose
        tokens differ between its choices (cut to fit a long choice, or a token spanning prompt and answer) is
        scored as separate (prompt, choice) sequences, so the scores are the same either way.
        """
        chunks = [
            self._shared_prompt_scores(prompts[i : i + batch_size], choices, task, batch_size)
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, len(choices))

    def _shared_prompt_scores(
        self, prompts: Sequence[str], choices: Sequence[str], task: str, batch_size: int
    ) -> torch.Tensor:
        k = len(choices)
        enc = encode_generative(
            self.tokenizer,
            [p for p in prompts for _ in choices],
            list(choices) * len(prompts),
            self.backbone.max_generative_len,
        )
        heads, tails = [], []
        for ids, labels, mask in zip(enc["input_ids"].tolist(), enc["labels"].tolist(), enc["attention_mask"].tolist()):
            n = sum(mask)
            start = next((t for t in range(n) if labels[t] != IGNORE_INDEX), n)
            heads.append(ids[:start])
            tails.append(ids[start:n])
        rows = [(heads[i * k : (i + 1) * k], tails[i * k : (i + 1) * k]) for i in range(len(prompts))]
        shared = [i for i, (h, t) in enumerate(rows) if all(x == h[0] for x in h) and all(t)]
        apart = [i for i in range(len(prompts)) if i not in set(shared)]
        scores = torch.empty(len(prompts), k)
        if shared:
            scores[shared] = self._cached_scores([rows[i][0][0] for i in shared], [rows[i][1] for i in shared], task)
        if apart:
            pairs = [(prompts[i], c) for i in apart for c in choices]
            parts = [self._pair_scores(pairs[j : j + batch_size], task) for j in range(0, len(pairs), batch_size)]
            scores[apart] = torch.cat(parts).view(len(apart), k)
        return scores

    def _cached_scores(self, heads: list[list[int]], tails: list[list[list[int]]], task: str) -> torch.Tensor:
        """(prompts, choices) scores from one left-padded pass over the prompt tokens ``heads``, then one short
        pass per choice over its tokens ``tails[i][j]`` on top of the cache, cropped back after each."""
        pad, width = self.tokenizer.pad_token_id, max(len(h) for h in heads)
        ids = self._tensor(torch.tensor([[pad] * (width - len(h)) + h for h in heads]))
        attention = self._tensor(torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in heads]))
        task_ids = self.task_ids([task] * len(heads))
        decoder, lm_head = self.tuner.model.base_model, self.tuner.model.get_output_embeddings()
        embeds, attention, _ = self._inputs(ids, attention, task_ids)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=decoder.config)
        scores = torch.empty(len(heads), len(tails[0]))
        with self.tuner.route(task_ids, Mode.GENERATIVE):
            out = decoder(
                inputs_embeds=embeds,
                attention_mask=attention,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            first = F.log_softmax(lm_head(out.last_hidden_state[:, -1]).float(), -1)
            for j in range(scores.shape[1]):
                rows = [tail[j] for tail in tails]
                m = max(len(r) for r in rows)
                tokens = self._tensor(torch.tensor([r + [pad] * (m - len(r)) for r in rows]))
                mask = self._tensor(torch.tensor([[1] * len(r) + [0] * (m - len(r)) for r in rows]))
                total = first.gather(1, tokens[:, :1]).squeeze(1)
                if m > 1:
                    step = decoder(
                        inputs_embeds=self.tuner.model.get_input_embeddings()(tokens[:, :-1]),
                        attention_mask=torch.cat([attention, mask[:, :-1]], 1),
                        position_ids=positions[:, -1:] + 1 + torch.arange(m - 1, device=positions.device),
                        cache=cache,
                        use_cache=True,
                    )
                    logp = F.log_softmax(lm_head(step.last_hidden_state).float(), -1)
                    total = total + (logp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(1)
                    cache.crop(-(m - 1))
                scores[:, j] = (total / mask.sum(1)).cpu()
        return scores

    def _pair_scores(self, pairs: Sequence[tuple[str, str]], task: str) -> torch.Tensor:
        """Scores of (prompt, choice) pairs each run as its own sequence (the reference the cached path equals)."""
        batch = encode_generative(
            self.tokenizer, [p for p, _ in pairs], [c for _, c in pairs], self.backbone.max_generative_len
        )
        losses, rows = self.lm_token_losses(batch, self.task_ids([task] * len(pairs)))
        total = torch.zeros(len(pairs), device=losses.device).index_add_(0, rows, losses)
        count = torch.zeros(len(pairs), device=losses.device).index_add_(0, rows, torch.ones_like(losses))
        return (-total / count.clamp(min=1)).cpu()

    def merge_task(self, task: str) -> PreTrainedModel:
        """A plain transformers model with ``task``'s routed experts folded in (deep copy; self is unchanged)."""
        return self.tuner.merge_task(task)

    def _tensor(self, value: ArrayLike) -> torch.Tensor:
        return torch.as_tensor(value, device=self.device)
