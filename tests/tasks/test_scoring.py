"""Task suite, model side: tokenization rule, candidate scoring against a manual log-likelihood on a tiny Llama,
losses, greedy generation, evaluation, multi-task losses and calibration batches (tiny tokenizer built in code)."""

from __future__ import annotations

import pytest
import torch

from peft_mazo.tasks import (
    Example,
    MultiTaskSampler,
    average_score,
    batch_error,
    batch_loss,
    calibration_batches,
    calibration_loaders,
    candidate_scores,
    encode_batch,
    encode_continuations,
    evaluate_task,
    evaluate_tasks,
    generate_answers,
    multitask_losses,
    predict,
    sample_task,
    score_candidates,
)
from peft_mazo.tasks.encoding import truncate
from tests.helpers import SHARED_DATA, make_tiny_llama, make_tiny_tokenizer


SST2 = [
    Example("sst2", "a fine film It was", (" terrible", " great"), 1),
    Example("sst2", "bad It was", (" terrible", " great"), 0),
    Example("sst2", "one of the worst movies of the year , It was", (" terrible", " great"), 0),
]
COPA = [
    Example("copa", "The man fell because ", ("he slipped.", "it rained on the other side of town."), 0),
    Example("copa", "I ate so ", ("I was full.", "the dog barked."), 0),
]
SQUAD = [
    Example(
        "squad", "Title: T\nContext: Paris is in France.\nQuestion: Where is Paris?\nAnswer:", answers=("France",)
    ),
    Example("squad", "Title: U\nContext: x\nQuestion: y?\nAnswer:", answers=("ab cd", "ab")),
]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def manual_mean_log_prob(model, tok, prompt: str, continuation: str) -> float:
    """The documented rule by hand for a character tokenizer: BOS + prompt (trailing spaces moved to the
    continuation) then the continuation's characters; one unpadded sequence, mean log p of the continuation."""
    stripped = prompt.rstrip(" ")
    context = [tok.bos_token_id] + tok(stripped, add_special_tokens=False)["input_ids"]
    cont = tok(prompt[len(stripped) :] + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + cont])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    picked = [log_probs[len(context) - 1 + i, t] for i, t in enumerate(cont)]
    return float(torch.stack(picked).mean())


# ----------------------------------------------------------------------------------------------------- tokenization
def test_continuation_tokens_are_exactly_the_continuation(tok):
    pairs = encode_continuations(tok, ["abc It was", "x because "], [" great", "the sun."])
    (ctx0, cont0), (ctx1, cont1) = pairs
    assert ctx0[0] == tok.bos_token_id and tok.decode(ctx0[1:]) == "abc It was"
    assert tok.decode(cont0) == " great"
    assert tok.decode(ctx1[1:]) == "x because" and tok.decode(cont1) == " the sun."  # trailing space moved


def test_boundary_merge_falls_back_to_separate_tokenization():
    tok = make_tiny_tokenizer(merges=[("a", "b"), ("Y", "e"), ("Ye", "s")])
    (ctx, cont), (ctx2, cont2) = encode_continuations(tok, ["xa", "Q\n"], ["b", "Yes"])
    # Jointly "xab" would be ["x", "ab"]; the prompt's tokens are kept and "b" is tokenized on its own.
    assert tok.convert_ids_to_tokens(ctx) == ["<s>", "x", "a"] and tok.convert_ids_to_tokens(cont) == ["b"]
    assert tok.convert_ids_to_tokens(cont2) == ["Yes"]  # no merge across the boundary: joint tokens


def test_truncation_keeps_bos_and_the_continuation(tok):
    (ctx, cont), (ctx_short, _) = encode_continuations(tok, ["0123456789", "01"], [" yes", " no"], max_length=8)
    assert len(ctx) + len(cont) == 8
    assert ctx[0] == tok.bos_token_id and tok.decode(ctx[1:]) == "789" and tok.decode(cont) == " yes"
    assert tok.decode(ctx_short[1:]) == "01"
    assert truncate([1, 2, 3], [4, 5, 6, 7], 3, n_prefix=1) == ([3], [4, 5])
    assert truncate([1], [4, 5], None) == ([1], [4, 5])


def test_padding_uses_pad_token_else_eos():
    for tok, expected in ((make_tiny_tokenizer(), "</s>"), (make_tiny_tokenizer(pad=True), "<pad>")):
        batch = encode_batch(tok, SST2)
        pad_id = tok.convert_tokens_to_ids(expected)
        assert (batch.input_ids[batch.attention_mask == 0] == pad_id).all()
        assert (batch.attention_mask == 0).any()
        assert tok.pad_token_id is None or expected == "<pad>"  # the tokenizer itself is not modified


def test_encoded_batch_layout(tok):
    batch = encode_batch(tok, SST2 + [Example("sst2", "z It was", (" terrible", " great", " ok"), 2)])
    assert batch.input_ids.shape[0] == 9 and batch.candidate_index.shape == (4, 3)
    assert batch.candidate_index[0].tolist() == [0, 1, -1] and batch.candidate_index[3].tolist() == [6, 7, 8]
    assert batch.labels.tolist() == [1, 0, 0, 2]
    for row, text in ((0, " terrible"), (1, " great"), (8, " ok")):
        assert tok.decode(batch.input_ids[row][batch.target_mask[row]]) == text
    assert not (batch.target_mask & (batch.attention_mask == 0)).any()
    with pytest.raises(ValueError, match="one task"):
        encode_batch(tok, SST2[:1] + COPA[:1])


# ---------------------------------------------------------------------------------------------------------- scoring
def test_candidate_scores_equal_a_manual_log_likelihood(model, tok):
    examples = SST2 + COPA
    for group in (SST2, COPA):
        scores = score_candidates(model, tok, group)
        for b, ex in enumerate(group):
            for c, cand in enumerate(ex.candidates):
                manual = manual_mean_log_prob(model, tok, ex.prompt, cand)
                assert scores[b, c].item() == pytest.approx(manual, abs=1e-5)
    assert len(examples) == 5


def test_all_candidates_of_a_batch_go_through_one_forward(model, tok):
    shapes = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
    try:
        with torch.no_grad():
            candidate_scores(model, encode_batch(tok, SST2))
    finally:
        handle.remove()
    assert len(shapes) == 1 and shapes[0][0] == 6  # 3 examples x 2 candidates


def test_scores_do_not_depend_on_the_other_examples_of_the_batch(model, tok):
    with torch.no_grad():
        together = score_candidates(model, tok, SST2)
        alone = torch.cat([score_candidates(model, tok, [ex]) for ex in SST2])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_losses_and_predictions(model, tok):
    batch = encode_batch(tok, SST2)
    scores = candidate_scores(model, batch)
    expected = -torch.log_softmax(scores, dim=-1)[torch.arange(3), torch.tensor([1, 0, 0])].mean()
    torch.testing.assert_close(batch_loss(model, batch), expected)
    assert predict(model, batch).tolist() == scores.argmax(-1).tolist()
    # SQuAD: teacher forcing on " {first answer}\n", mean NLL over all target tokens of the batch.
    gen = encode_batch(tok, SQUAD)
    assert tok.decode(gen.input_ids[0][gen.target_mask[0]]) == " France\n"
    per_token = []
    for ex in SQUAD:
        n = len(ex.target)
        per_token.append(manual_mean_log_prob(model, tok, ex.prompt, ex.target) * n)
    n_tokens = sum(len(ex.target) for ex in SQUAD)
    assert batch_loss(model, gen).item() == pytest.approx(-sum(per_token) / n_tokens, abs=1e-5)
    with pytest.raises(ValueError, match="generation"):
        predict(model, gen)


def test_loss_is_differentiable_for_first_order_use(tok):
    model = make_tiny_llama()
    loss = batch_loss(model, encode_batch(tok, SST2))
    loss.backward()
    assert model.lm_head.weight.grad is not None


# -------------------------------------------------------------------------------------------------------- generation
class Scripted:
    """Makes a tiny Llama greedily emit a fixed text, one token per generation step (hooks on the decoder and lm_head;
    a forward over more than one new token is a prompt, which restarts the script)."""

    def __init__(self, model, tok, text: str) -> None:
        self.ids = tok(text, add_special_tokens=False)["input_ids"]
        self.calls = 0
        self.handles = [
            model.model.register_forward_pre_hook(self.restart, with_kwargs=True),
            model.lm_head.register_forward_hook(self.emit),
        ]

    def restart(self, module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            self.calls = 0

    def emit(self, module, inputs, output):
        logits = torch.zeros_like(output)
        logits[:, -1, self.ids[min(self.calls, len(self.ids) - 1)]] = 10.0
        self.calls += 1
        return logits

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_greedy_generation_stops_at_newline(tok):
    model = make_tiny_llama()
    script = Scripted(model, tok, " ab\ncd")
    try:
        answers = generate_answers(model, tok, SQUAD, max_new_tokens=50)
    finally:
        script.remove()
    assert answers == ["ab", "ab"]
    assert script.calls == 4  # " ", "a", "b", "\n": then every row has a newline


def test_generation_is_capped_at_max_new_tokens(tok):
    model = make_tiny_llama()
    script = Scripted(model, tok, "x")
    try:
        answers = generate_answers(model, tok, SQUAD[:1], max_new_tokens=7)
    finally:
        script.remove()
    assert answers == ["xxxxxxx"]


def test_evaluate_squad_f1_with_scripted_answers(tok):
    model = make_tiny_llama()
    script = Scripted(model, tok, " ab\n")
    try:
        result = evaluate_task(model, tok, "squad", SQUAD, batch_size=1)
    finally:
        script.remove()
    # "ab" vs "France" -> 0; "ab" vs ["ab cd", "ab"] -> 1.
    assert result == {"metric": "f1", "score": pytest.approx(50.0), "n": 2}


# -------------------------------------------------------------------------------------------------------- evaluation
def test_evaluate_task_accuracy_matches_scores(model, tok):
    model.train()
    grad_modes = []
    handle = model.register_forward_hook(lambda *args: grad_modes.append(torch.is_grad_enabled()))
    try:
        result = evaluate_task(model, tok, "SST-2", SST2, batch_size=2)
    finally:
        handle.remove()
    assert model.training  # mode restored
    model.eval()
    assert grad_modes == [False, False]
    predictions = score_candidates(model, tok, SST2).argmax(-1)
    expected = 100.0 * (predictions == torch.tensor([1, 0, 0])).float().mean().item()
    assert result == {"metric": "accuracy", "score": pytest.approx(expected), "n": 3}


def test_evaluate_tasks_and_bad_inputs(model, tok):
    results = evaluate_tasks(model, tok, {"sst2": SST2, "copa": COPA}, batch_size=4)
    assert list(results) == ["sst2", "copa"]
    for task, examples in (("sst2", SST2), ("copa", COPA)):  # the same as scoring each task on its own
        assert results[task] == evaluate_task(model, tok, task, examples, batch_size=4)
    assert average_score(results) == pytest.approx((results["sst2"]["score"] + results["copa"]["score"]) / 2)
    with pytest.raises(ValueError, match="Unknown task 'cola'. Known tasks"):
        evaluate_task(model, tok, "cola", SST2)
    with pytest.raises(ValueError, match="other tasks: copa"):
        evaluate_task(model, tok, "sst2", SST2 + COPA)
    with pytest.raises(ValueError, match="No examples"):
        evaluate_task(model, tok, "sst2", [])
    with pytest.raises(ValueError, match="Unknown task"):  # checked before the first task is scored
        evaluate_tasks(model, tok, {"sst2": SST2, "mnli": SST2})


# ------------------------------------------------------------------------------------------------ multi-task losses
def test_multitask_losses_for_a_zo_closure(model, tok):
    sampler = MultiTaskSampler({"sst2": SST2, "copa": COPA, "squad": SQUAD}, batch_size=2, seed=0)
    batches = next(sampler.encoded(tok))
    losses = multitask_losses(model, batches)
    assert losses.shape == (3,) and losses.dtype == torch.float32 and not losses.requires_grad
    expected = torch.stack([batch_loss(model, b) for b in batches.values()]).detach()
    torch.testing.assert_close(losses, expected)
    with_grad = multitask_losses(model, batches, with_grad=True)
    assert with_grad.requires_grad

    def closure():
        return multitask_losses(model, batches)

    torch.testing.assert_close(closure(), closure())  # deterministic forward, as a ZO step needs


def test_multitask_error_objective(tok):
    model = make_tiny_llama()
    batches = {"sst2": encode_batch(tok, SST2), "squad": encode_batch(tok, SQUAD)}
    script = Scripted(model, tok, " ab\n")
    try:
        errors = multitask_losses(model, batches, objective="error")
    finally:
        script.remove()
    assert errors.shape == (2,)
    assert errors[1].item() == pytest.approx(0.5)  # 1 - mean F1
    accuracy = (predict(model, batches["sst2"]) == batches["sst2"].labels).float().mean()
    assert errors[0].item() == pytest.approx(1 - accuracy.item())
    assert batch_error(model, batches["sst2"]).item() == pytest.approx(errors[0].item())
    with pytest.raises(ValueError, match="objective"):
        multitask_losses(model, batches, objective="accuracy")


# -------------------------------------------------------------------------------------------------------- calibration
def test_calibration_batches_hold_prompt_and_gold_continuation(tok):
    pool = SST2 + [Example("sst2", f"film {i} It was", (" terrible", " great"), i % 2) for i in range(5)]
    batches = calibration_batches("sst2", tok, batch_size=3, num_batches=2, examples=pool, seed=0)
    assert len(batches) == 2 and all(set(b) == {"input_ids", "attention_mask"} for b in batches)
    texts = []
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 3
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # right-padded
            assert ids[0] == tok.bos_token_id
            texts.append(tok.decode(ids[1:n]))
    assert set(texts) <= {ex.prompt + ex.target for ex in pool} and len(set(texts)) == 6
    again = calibration_batches("sst2", tok, batch_size=3, num_batches=2, examples=pool, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    with pytest.warns(UserWarning, match="'sst2': requested 4 calibration batches of 3"):
        short = calibration_batches("sst2", tok, batch_size=3, num_batches=4, examples=pool)
    assert [b["input_ids"].shape[0] for b in short] == [3, 3, 2]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_calibration_loaders_from_the_train_files(tok):
    loaders = calibration_loaders(["squad", "copa"], tok, batch_size=2, num_batches=2, data_dir=SHARED_DATA)
    assert list(loaders) == ["squad", "copa"]
    first = loaders["squad"][0]
    text = tok.decode(first["input_ids"][0][first["attention_mask"][0].bool()][1:])
    assert text.startswith("Title: ") and "\nAnswer: " in text and text.endswith("\n")
    train = sample_task("copa", data_dir=SHARED_DATA, n_train=8, n_val=0, n_test=0).train
    from_split = calibration_loaders(["copa"], tok, 4, 2, examples_by_task={"copa": train})["copa"]
    assert sum(b["input_ids"].shape[0] for b in from_split) == 8
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        calibration_loaders(["sst2"], tok, data_dir=SHARED_DATA / "missing")
