"""Input formats: which tokens are text (pooled), which are response (labelled), truncation and padding."""

import numpy as np
import pytest

from recfound.model.formats import (
    IGNORE_INDEX,
    Side,
    embedding_prefix,
    encode_embedding,
    encode_generative,
    encode_prompt,
    prompt_prefix,
)
from recfound.model.tokenizer import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _decode(tok, ids) -> str:
    return tok.decode(ids.tolist())


def test_embedding_format_and_text_mask_covers_exactly_the_text(tok):
    instructions = ["Represent this user query to find a matching item", ""]
    texts = ["red running shoes", "a blue hat"]
    batch = encode_embedding(tok, instructions, texts, max_len=128)
    assert set(batch) == {"input_ids", "attention_mask", "text_mask"}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in batch.values())
    assert embedding_prefix("") == "<|embed|>\n"
    assert embedding_prefix("do x") == "<|user|>\ndo x\n<|embed|>\n"
    for row, (instruction, text) in enumerate(zip(instructions, texts)):
        ids, attention, text_mask = (batch[k][row] for k in ("input_ids", "attention_mask", "text_mask"))
        assert _decode(tok, ids[text_mask == 1]) == text
        assert _decode(tok, ids[(attention == 1) & (text_mask == 0)]) == embedding_prefix(instruction)
        assert not text_mask[attention == 0].any()


def test_embedding_truncation_cuts_the_text_end(tok):
    batch = encode_embedding(tok, ["inst"], ["abcdefghij"], max_len=len(embedding_prefix("inst")) + 4)
    assert _decode(tok, batch["input_ids"][0][batch["text_mask"][0] == 1]) == "abcd"


def test_a_history_query_keeps_its_end_and_the_instruction(tok):
    """A u2i query is a history, oldest first: over budget it loses its oldest items, never the most recent; every
    other task and side keeps the text's start (an item's title comes first)."""
    history = "1. old kettle\n2. new mug"
    whole = encode_embedding(tok, ["inst"], [history], max_len=128)
    budget = int(whole["attention_mask"].sum() - whole["text_mask"].sum()) + len("2. new mug")  # bytes: 1 per char
    kept = encode_embedding(tok, ["inst"], [history], max_len=budget, keep_end=Side.QUERY.keeps_end("u2i"))
    ids, text_mask = kept["input_ids"][0], kept["text_mask"][0]
    assert _decode(tok, ids[text_mask == 1]) == "2. new mug" and len(ids) == budget
    assert _decode(tok, ids[text_mask == 0]) == embedding_prefix("inst")
    assert [side.keeps_end(task) for side in Side for task in ("u2i", "q2i", "i2i")] == [True] + [False] * 5


def test_generative_labels_cover_exactly_response_and_eos(tok):
    prompts, responses = ["Rewrite: cheap shoes", "Is it good?"], ["affordable footwear", "yes"]
    batch = encode_generative(tok, prompts, responses, max_len=128)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, attention, labels = (batch[k][row] for k in ("input_ids", "attention_mask", "labels"))
        labelled = labels != IGNORE_INDEX
        assert (labels[labelled] == ids[labelled]).all()
        assert _decode(tok, ids[labelled]) == response + tok.eos_token
        assert _decode(tok, ids[(attention == 1) & ~labelled]) == f"<|user|>\n{prompt}\n<|assistant|>\n"
        assert (labels[attention == 0] == IGNORE_INDEX).all()


def test_generative_truncation_drops_prompt_start_and_keeps_markers_and_response(tok):
    prompt, response = "0123456789" * 5 + "END", "the answer"
    full = len(prompt_prefix(prompt) + response) + 1  # byte tokenizer: one token per char, +1 for eos
    batch = encode_generative(tok, [prompt], [response], max_len=full - 20)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert len(ids) == full - 20
    text = _decode(tok, ids)
    assert text.startswith("<|user|>\n") and text.endswith("END\n<|assistant|>\nthe answer" + tok.eos_token)
    assert _decode(tok, ids[labels != IGNORE_INDEX]) == response + tok.eos_token


def test_padding_sides(tok):
    right = encode_embedding(tok, ["", ""], ["a", "abcdef"], max_len=64)
    left = encode_embedding(tok, ["", ""], ["a", "abcdef"], max_len=64, padding_side="left")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    for key in right:
        kept_right = right[key][0][right["attention_mask"][0] == 1]
        np.testing.assert_array_equal(kept_right, left[key][0][left["attention_mask"][0] == 1])


def test_encode_prompt_is_left_padded_generation_context(tok):
    batch = encode_prompt(tok, ["hi", "a longer prompt"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert _decode(tok, batch["input_ids"][0][batch["attention_mask"][0] == 1]) == prompt_prefix("hi")


def test_length_mismatch_is_an_error(tok):
    with pytest.raises(ValueError, match="2 instructions for 1 texts"):
        encode_embedding(tok, ["a", "b"], ["x"], max_len=8)


def test_a_budget_the_instruction_fills_is_an_error_not_a_zero_vector(tok):
    """Pooling over no text tokens would embed every such text identically (the zero vector, silently)."""
    instruction = "Represent this product to match it with search queries for it"
    with pytest.raises(ValueError, match="fills the whole 32-token budget"):
        encode_embedding(tok, [instruction], ["red shoes"], max_len=32)
    assert encode_embedding(tok, [instruction], ["red shoes"], max_len=128)["text_mask"].sum() > 0
