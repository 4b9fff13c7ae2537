"""GRM: bidirectional embedding vs causal generation, padding invariance, losses, generation, toy training."""

import pytest
import torch

from recfound.model.backbone import BackboneConfig
from recfound.model.formats import encode_embedding, encode_generative
from recfound.model.grm import GRM
from recfound.model.losses import LossConfig, contrastive_loss, total_loss
from recfound.model.tmole import TMoLEConfig
from recfound.tasks import Mode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def grm() -> GRM:
    """Tiny GRM in eval mode with perturbed adapters, so routing actually changes the outputs."""
    torch.manual_seed(0)
    model = GRM.build(BackboneConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


INSTRUCTIONS = ["Represent this user query to find a matching item", "", "Embed the product"]
TEXTS = ["red running shoes for trail", "hat", "a blue ceramic coffee mug, 350 ml"]


def test_embedding_attention_is_bidirectional_and_generation_is_causal(grm):
    batch = encode_embedding(grm.tokenizer, ["find"], ["abcdef"], max_len=64)
    first_text = int(batch["text_mask"][0].argmax())
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][0, -1] += 1  # a token after the first text token
    for mode, should_change in ((Mode.EMBEDDING, True), (Mode.GENERATIVE, False)):
        task = grm.task_ids(["q2i" if mode is Mode.EMBEDDING else "query_rewriting"])
        before = grm.hidden_states(batch["input_ids"], batch["attention_mask"], task, mode)[0, first_text]
        after = grm.hidden_states(changed["input_ids"], changed["attention_mask"], task, mode)[0, first_text]
        if should_change:
            assert (before - after).abs().max() > 1e-3
        else:
            torch.testing.assert_close(before, after, atol=1e-6, rtol=0)


def test_causal_embedding_attention_keeps_the_pretrained_causal_mask():
    """model.backbone.embedding_attention=causal: an embedding token sees only what comes before it (the backbone
    as it was pretrained), whichever way the batch is padded; the full-depth exit reads the same states."""
    torch.manual_seed(0)
    causal = GRM.build(BackboneConfig(embedding_attention="causal")).eval()
    batch = encode_embedding(causal.tokenizer, ["find"], ["abcdef"], max_len=64)
    first_text = int(batch["text_mask"][0].argmax())
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][0, -1] += 1
    task = causal.task_ids(["q2i"])
    before = causal.hidden_states(batch["input_ids"], batch["attention_mask"], task, Mode.EMBEDDING)[0, first_text]
    after = causal.hidden_states(changed["input_ids"], changed["attention_mask"], task, Mode.EMBEDDING)[0, first_text]
    torch.testing.assert_close(before, after, atol=1e-6, rtol=0)
    tasks = causal.task_ids(["q2i", "u2i", "i2i"])
    right = causal.embed(encode_embedding(causal.tokenizer, INSTRUCTIONS, TEXTS, 128), tasks)
    left = causal.embed(encode_embedding(causal.tokenizer, INSTRUCTIONS, TEXTS, 128, padding_side="left"), tasks)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    batch = encode_embedding(causal.tokenizer, INSTRUCTIONS, TEXTS, 128)
    torch.testing.assert_close(causal.embed_exits(batch, tasks, [causal.num_layers])[0], right, atol=1e-5, rtol=0)


def test_embeddings_do_not_depend_on_padding_side_or_other_rows(grm):
    tasks = grm.task_ids(["q2i", "u2i", "i2i"])
    right = grm.embed(encode_embedding(grm.tokenizer, INSTRUCTIONS, TEXTS, 128), tasks)
    left = grm.embed(encode_embedding(grm.tokenizer, INSTRUCTIONS, TEXTS, 128, padding_side="left"), tasks)
    alone = torch.cat(
        [
            grm.embed(encode_embedding(grm.tokenizer, [i], [t], 128), tasks[n : n + 1])
            for n, (i, t) in enumerate(zip(INSTRUCTIONS, TEXTS))
        ]
    )
    assert right.shape == (3, 64)
    torch.testing.assert_close(right.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=0)


def test_embedding_is_the_mean_of_text_token_states_only(grm):
    batch = encode_embedding(grm.tokenizer, INSTRUCTIONS, TEXTS, 128)
    tasks = grm.task_ids(["q2i", "u2i", "i2i"])
    hidden = grm.hidden_states(batch["input_ids"], batch["attention_mask"], tasks, Mode.EMBEDDING)
    for row in range(3):
        text = torch.as_tensor(batch["text_mask"][row]).bool()
        expected = torch.nn.functional.normalize(hidden[row, text].mean(0), dim=-1)
        torch.testing.assert_close(grm.embed(batch, tasks)[row], expected, atol=1e-6, rtol=0)


def test_embedding_gradients_survive_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same adapter init and perturbation for both models
        model = GRM.build(BackboneConfig(gradient_checkpointing=checkpointing), TMoLEConfig(dropout=0.0)).train()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        batch = encode_embedding(model.tokenizer, INSTRUCTIONS, TEXTS, 128)
        model.embed(batch, model.task_ids(["q2i", "u2i", "i2i"])).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[1]["tuner.tmole_task_table.default.weight"].abs().sum() > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_lm_loss_is_response_only_token_mean(grm):
    batch = encode_generative(grm.tokenizer, ["Rewrite: cheap shoes", "Yes or no?"], ["budget footwear", "no"], 128)
    tasks = grm.task_ids(["query_rewriting", "answerability_prediction"])
    labels = torch.as_tensor(batch["labels"])
    logits = grm.tuner(input_ids=torch.as_tensor(batch["input_ids"]), task_ids=tasks).logits
    targets = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100])
    torch.testing.assert_close(grm.lm_loss(batch, tasks), expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_is_deterministic_and_batch_independent(grm):
    prompts = ["Rewrite the query: cheap shoes", "hi"]
    batched = grm.generate(prompts, "query_rewriting", max_new_tokens=6)
    alone = [grm.generate([p], "query_rewriting", max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(text, str) for text in batched)
    with pytest.raises(ValueError, match="not in this adapter's task list"):
        grm.generate(prompts, "no_such_task")


def test_choice_scores_are_each_pairs_own_mean_log_likelihood(grm):
    prompts, choices = ["Rate the review: great mug, love it", "Is this a match?"], ["positive", "no", "very negative"]
    scores = grm.choice_scores(prompts, choices, "sentiment_analysis", batch_size=4)  # 6 pairs: 2 passes
    for i, prompt in enumerate(prompts):
        for j, choice in enumerate(choices):  # alone, unpadded: batching must not change a pair's score
            alone = encode_generative(grm.tokenizer, [prompt], [choice], 128)
            expected = -grm.lm_loss(alone, grm.task_ids(["sentiment_analysis"]))
            torch.testing.assert_close(scores[i, j], expected, atol=1e-5, rtol=1e-5)


def test_choice_scores_run_each_prompt_once_and_equal_separate_sequences(grm):
    """Prompts of different lengths share one pass per batch and each choice continues from the cache; a prompt cut
    differently for each choice (here: too long for the budget) falls back to separate sequences. Either way every
    score equals the (prompt, choice) pair scored alone."""
    grm.backbone = grm.backbone.model_copy(update={"max_generative_len": 80})
    long = "Is this a match? " + "listing words " * 40
    prompts = ["Rate the review: great mug, love it", long, "Is this a match?", "Rate: ok"]
    choices = ["positive", "no", "very negative"]
    passes: list[int] = []
    hook = grm.tuner.model.base_model.register_forward_hook(lambda m, a, k, out: passes.append(1), with_kwargs=True)
    try:
        scores = grm.choice_scores(prompts, choices, "sentiment_analysis", batch_size=3)
    finally:
        hook.remove()
    # batch 1: two shared prompts (1 prompt pass + 3 choice passes) and the long one (3 pairs: 1 pass); batch 2: one
    # shared prompt (1 + 3). Separately, 12 pairs would take 4 passes of whole prompts.
    assert len(passes) == 4 + 1 + 4
    for i, prompt in enumerate(prompts):
        for j, choice in enumerate(choices):
            alone = encode_generative(grm.tokenizer, [prompt], [choice], 80)
            expected = -grm.lm_loss(alone, grm.task_ids(["sentiment_analysis"]))
            torch.testing.assert_close(scores[i, j], expected, atol=1e-5, rtol=1e-5)


def test_save_and_reload_reproduces_embeddings_and_losses(grm, tmp_path):
    grm.save_pretrained(str(tmp_path))
    loaded = GRM.from_pretrained(str(tmp_path)).eval()
    assert loaded.backbone == grm.backbone
    batch = encode_embedding(grm.tokenizer, INSTRUCTIONS, TEXTS, 128)
    tasks = grm.task_ids(["q2i", "u2i", "i2i"])
    assert torch.equal(loaded.embed(batch, tasks), grm.embed(batch, tasks))
    gen = encode_generative(grm.tokenizer, ["p"], ["r"], 64)
    gen_tasks = grm.task_ids(["item_profile"])
    assert torch.equal(loaded.lm_loss(gen, gen_tasks), grm.lm_loss(gen, gen_tasks))


def test_toy_two_task_problem_drives_both_losses_down():
    """One embedding task (u2i) and one generative task (query_rewriting) trained jointly on synthetic strings."""
    torch.manual_seed(0)
    model = GRM.build(BackboneConfig(), TMoLEConfig(dropout=0.0)).train()
    tok, cfg = model.tokenizer, LossConfig()
    colors = ["red", "blue", "green", "black", "white", "pink"]
    things = ["shoe", "hat", "lamp", "sofa", "cup", "bag"]
    n = len(colors)
    items = [f"{c} {t}" for c, t in zip(colors, things)]
    negatives = [f"{colors[(i + 2) % n]} {things[(i + 1) % n]}" for i in range(n)]  # never another's positive
    queries = encode_embedding(tok, ["next item"] * n, [f"likes {t}" for t in things], 32)
    passages = encode_embedding(tok, [""] * 2 * n, [x for pair in zip(items, negatives) for x in pair], 32)
    generative = encode_generative(tok, [f"{t}?" for t in things], colors, 32)
    q_tasks, p_tasks = model.task_ids(["u2i"] * n), model.task_ids(["u2i"] * 2 * n)
    g_tasks = model.task_ids(["query_rewriting"] * n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(200):
        emb_loss = contrastive_loss(
            model.embed(queries, q_tasks), model.embed(passages, p_tasks).reshape(n, 2, -1), cfg.temperature
        ).loss
        gen_loss = model.lm_loss(generative, g_tasks)
        optimizer.zero_grad()
        total_loss(cfg, emb_loss, gen_loss).backward()
        optimizer.step()
        history.append((emb_loss.item(), gen_loss.item()))
    (emb_first, gen_first), (emb_last, gen_last) = history[0], history[-1]
    assert emb_last < 0.5 * emb_first, history[::10]
    assert gen_last < 0.5 * gen_first, history[::10]
