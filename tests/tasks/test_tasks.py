"""Task suite: templates (MAZO_SPEC §5, exact strings on records of ../shared/data), registry, data loading and its
errors, sampling, metrics and the multi-task sampler. Model-side tests are in test_tasks_scoring.py."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from peft_mazo.tasks import (
    TASK_NAMES,
    Example,
    MultiTaskSampler,
    TaskDataError,
    UnknownTaskError,
    accuracy,
    canonical_task_name,
    exact_match,
    get_task,
    load_examples,
    normalize_answer,
    sample_examples,
    sample_task,
    sample_tasks,
    squad_exact_match,
    squad_f1,
    token_f1,
)
from peft_mazo.tasks.data import hub_rows_to_records, missing_field
from tests.helpers import SHARED_DATA


needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")


def record(task: str, line: int = 1, split: str = "train") -> dict:
    """Line `line` (1-based) of a shared data file."""
    with open(SHARED_DATA / task / f"{split}.jsonl", encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if number == line:
                return json.loads(text)
    raise IndexError(line)


def render(task: str, rec: dict) -> list[Example]:
    return get_task(task).render(rec, f"{task}/test")


# ------------------------------------------------------------------------------------------------------- templates
@needs_data
def test_sst2_template():
    (ex,) = render("sst2", record("sst2"))
    # The GLUE sentence ends with a space, and the template adds " It was": two spaces, as in MeZO.
    assert ex.prompt == "are more deeply thought through than in most ` right-thinking ' films  It was"
    assert ex.candidates == (" terrible", " great")
    assert ex.label == 1
    assert ex.target == " great"


@needs_data
def test_boolq_template():
    rec = record("boolq")
    (ex,) = render("boolq", rec)
    assert ex.prompt == rec["passage"] + " Does ethanol take more energy make that produces?\n"
    assert ex.prompt.startswith("Ethanol fuel -- All biomass goes through")
    assert ex.candidates == ("Yes", "No")
    assert ex.label == 1  # false -> "No"


def test_boolq_keeps_existing_question_mark():
    (ex,) = render("boolq", {"passage": "P.", "question": "is it?", "label": True})
    assert ex.prompt == "P. Is it?\n"
    assert ex.label == 0


@needs_data
def test_rte_template():
    (ex,) = render("rte", record("rte"))
    assert ex.prompt == (
        "No Weapons of Mass Destruction Found in Iraq Yet.\n"
        'Does this mean that "Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n'
    )
    assert ex.candidates == ("Yes", "No")
    assert ex.label == 1  # not_entailment -> "No"


@needs_data
def test_wsc_template():
    (ex,) = render("wsc", record("wsc"))
    assert ex.prompt == (
        "Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
        "skeptical.\n"
        'In the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n'
    )
    assert ex.candidates == ("No", "Yes")
    assert ex.label == 0


@needs_data
def test_wic_template():
    (ex,) = render("wic", record("wic"))
    assert ex.prompt == (
        'Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
        "Do you want to come over to my place later?\n"
        "A political system with no place for the less prominent groups.\n"
    )
    assert ex.candidates == ("No", "Yes")
    assert ex.label == 0


@needs_data
def test_copa_template_cause_effect_and_capitalisation():
    (cause,) = render("copa", record("copa", 1))
    assert cause.prompt == "My body cast a shadow over the grass because "
    assert cause.candidates == ("the sun was rising.", "the grass was cut.")
    assert cause.label == 0
    (first_person,) = render("copa", record("copa", 7))
    assert first_person.prompt == "The stain came out of the shirt because "
    assert first_person.candidates == ("I patched the shirt.", "I bleached the shirt.")
    assert first_person.label == 1
    (effect,) = render("copa", record("copa", 9))
    assert effect.prompt == "The physician misdiagnosed the patient so "
    assert effect.candidates == (
        "the patient filed a malpractice lawsuit against the physician.",
        "the patient disclosed confidential information to the physician.",
    )
    assert effect.prompt + effect.target == (
        "The physician misdiagnosed the patient so the patient filed a malpractice lawsuit against the physician."
    )


@needs_data
def test_multirc_template_one_example_per_answer_option():
    rec = record("multirc")
    examples = render("multirc", rec)
    assert len(examples) == 168  # options of all questions of passage 0
    paragraph = rec["passage"]["text"]
    assert examples[0].prompt == (
        paragraph + "\nQuestion: What did the high-level effort to persuade Pakistan include?\n"
        'I found this answer "Children, Gerd, or Dorian Popa". Is that correct? Yes or No?\n'
    )
    assert examples[0].candidates == ("No", "Yes")
    assert [e.label for e in examples[:4]] == [0, 0, 1, 1]
    assert examples[2].prompt.endswith(
        'I found this answer "Asking Pakistan to help the USA". Is that correct? Yes or No?\n'
    )
    assert examples[9].prompt.startswith(paragraph + "\nQuestion: Following his meeting with US Assistant Secretary")
    assert examples[9].uid == "multirc/test/q1/a0"


@needs_data
def test_squad_template_and_target():
    rec = record("squad")
    (ex,) = render("squad", rec)
    assert ex.prompt == (
        "Title: 1973_oil_crisis\nContext: "
        + rec["context"]
        + "\nQuestion: When did the 1973 oil crisis begin?\nAnswer:"
    )
    assert ex.candidates == ()
    assert ex.label is None
    assert ex.answers == ("October 1973", "October 1973", "October 1973", "October", "1973")
    assert ex.target == " October 1973\n"
    assert ex.is_generation


@needs_data
@pytest.mark.parametrize("task", TASK_NAMES)
def test_loader_renders_the_first_record_like_the_template(task):
    examples = load_examples(task, "train", SHARED_DATA)
    first = render(task, record(task))
    assert [(e.prompt, e.candidates, e.label, e.answers) for e in examples[: len(first)]] == [
        (e.prompt, e.candidates, e.label, e.answers) for e in first
    ]
    spec = get_task(task)
    assert all(e.task == task for e in examples)
    assert all(e.is_generation == (spec.kind == "generation") for e in examples)


def test_example_checks_its_label():
    with pytest.raises(ValueError, match="label"):
        Example("sst2", "p", (" a", " b"), 2)
    with pytest.raises(ValueError, match="neither candidates nor gold answers"):
        Example("squad", "p")


# -------------------------------------------------------------------------------------------------------- registry
def test_registry_names_and_metrics():
    assert TASK_NAMES == ("sst2", "boolq", "rte", "wsc", "wic", "multirc", "copa", "squad")
    assert canonical_task_name("SST-2") == "sst2"
    assert canonical_task_name("MultiRC") == "multirc"
    assert canonical_task_name("squad_v1.1") == "squad"
    assert {get_task(t).metric for t in TASK_NAMES if t != "squad"} == {"accuracy"}
    assert get_task("squad").metric == "f1" and get_task("squad").kind == "generation"


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match="Unknown task 'mnli'. Known tasks: sst2, boolq, rte, wsc, wic"):
        get_task("mnli")
    with pytest.raises(UnknownTaskError, match="squad"):
        sample_tasks(["sst2", "cola"], data_dir="/nonexistent")  # the name is checked before the directory


# ------------------------------------------------------------------------------------------------ data loading errors
def write_task(root, task: str, train: list, validation: list | None = None) -> None:
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("validation", validation if validation is not None else train)):
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def sst2_rows(n: int, start: int = 0) -> list[dict]:
    return [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(start, start + n)]


def test_missing_data_directory_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        sample_task("sst2", data_dir=missing)
    assert str(missing) in str(err.value)
    assert "train.jsonl" in str(err.value) and "hub" in str(err.value)


def test_missing_data_file_is_reported_before_any_task_is_loaded(tmp_path, monkeypatch):
    write_task(tmp_path, "sst2", sst2_rows(4))
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text("not even json\n")
    calls = []
    monkeypatch.setattr("peft_mazo.tasks.data.read_jsonl", lambda path: calls.append(path))
    with pytest.raises(FileNotFoundError) as err:
        sample_tasks(["sst2", "rte"], data_dir=tmp_path)
    assert str(tmp_path / "rte" / "validation.jsonl") in str(err.value)
    assert "rte" in str(err.value)
    assert calls == []


def test_record_missing_a_field_names_file_line_and_field(tmp_path):
    rows = sst2_rows(3)
    del rows[1]["label"]
    write_task(tmp_path, "sst2", rows)
    with pytest.raises(TaskDataError) as err:
        load_examples("sst2", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "sst2" / "train.jsonl") in message
    assert "line 2" in message and "'label'" in message


def test_nested_missing_field_is_named_with_its_position(tmp_path):
    rec = {
        "idx": 0,
        "passage": {
            "text": "T",
            "questions": [
                {"question": "Q0", "idx": 0, "answers": [{"text": "A", "idx": 0, "label": 1}]},
                {
                    "question": "Q1",
                    "idx": 1,
                    "answers": [{"text": "A", "idx": 1, "label": 0}, {"text": "B", "idx": 2}],
                },
            ],
        },
    }
    good = {**rec, "passage": {**rec["passage"], "questions": rec["passage"]["questions"][:1]}}
    write_task(tmp_path, "multirc", [good, rec])
    with pytest.raises(TaskDataError, match=r"line 2: .*'passage\.questions\[1\]\.answers\[1\]\.label'"):
        load_examples("multirc", "train", tmp_path)
    assert missing_field({"target": "x"}, "target.span1_text") == "target.span1_text"
    assert missing_field({"a": [{"b": 1}, {"b": None}]}, "a[].b") == "a[1].b"
    assert missing_field({"a": [{"b": 1}]}, "a[].b") is None


def test_invalid_json_and_bad_label_values_name_the_line(tmp_path):
    write_task(tmp_path, "sst2", [*sst2_rows(2), "{oops"])
    with pytest.raises(TaskDataError, match=r"train\.jsonl, line 3: not valid JSON"):
        load_examples("sst2", "train", tmp_path)
    write_task(tmp_path, "rte", [{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 0}])
    with pytest.raises(TaskDataError, match=r"line 1: field 'label' must be 'entailment' or 'not_entailment'"):
        load_examples("rte", "train", tmp_path)
    write_task(tmp_path, "copa", [{"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}])
    with pytest.raises(TaskDataError, match="'cause' or 'effect'"):
        load_examples("copa", "validation", tmp_path)


def test_unknown_split_and_bad_sizes(tmp_path):
    write_task(tmp_path, "sst2", sst2_rows(4))
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_examples("sst2", "test", tmp_path)
    with pytest.raises(ValueError, match="n_val must be a non-negative integer"):
        sample_task("sst2", data_dir=tmp_path, n_val=-1)
    with pytest.raises(ValueError, match="more than once"):
        sample_tasks(["sst2", "SST-2"], data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------- hub path
def test_hub_rows_are_mapped_to_the_file_schema(monkeypatch):
    hub = {
        ("aps/super_glue", "rte"): [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 0}],
        ("aps/super_glue", "wsc.fixed"): [
            {
                "text": "A saw B. He left.",
                "span1_index": 0,
                "span2_index": 3,
                "span1_text": "A",
                "span2_text": "He",
                "idx": 0,
                "label": 1,
            }
        ],
        ("aps/super_glue", "multirc"): [
            {
                "paragraph": "P",
                "question": "Q",
                "answer": a,
                "idx": {"paragraph": 0, "question": q, "answer": i},
                "label": i % 2,
            }
            for i, (q, a) in enumerate([(0, "x"), (0, "y"), (1, "z")])
        ],
        ("aps/super_glue", "boolq"): [{"question": "q", "passage": "p", "idx": 0, "label": 1}],
    }
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return hub[(path, name)]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    (rte,) = load_examples("rte", "train")
    assert rte.label == 0 and rte.candidates == ("Yes", "No")
    (wsc,) = load_examples("wsc", "validation")
    assert '"he" refer to A?' in wsc.prompt and wsc.label == 1
    multirc = load_examples("multirc", "train")
    assert [e.label for e in multirc] == [0, 1, 0]
    assert [e.uid for e in multirc] == ["multirc/0/q0/a0", "multirc/0/q0/a1", "multirc/0/q1/a0"]
    (boolq,) = load_examples("boolq", "train")
    assert boolq.label == 0
    assert calls[0] == ("aps/super_glue", "rte", "train")
    assert calls[1] == ("aps/super_glue", "wsc.fixed", "validation")
    grouped = hub_rows_to_records("multirc", hub[("aps/super_glue", "multirc")])
    assert len(grouped) == 1 and [len(q["answers"]) for q in grouped[0]["passage"]["questions"]] == [2, 1]


# ---------------------------------------------------------------------------------------------------------- sampling
def make_pool(task: str, n: int) -> list[Example]:
    return [Example(task, f"p{i}", (" a", " b"), i % 2, uid=f"{task}/{i}") for i in range(n)]


def test_sampling_is_disjoint_seeded_and_nested():
    pool, test_pool = make_pool("sst2", 100), make_pool("sst2", 30)
    a = sample_examples(pool, test_pool, "sst2", n_train=40, n_val=20, n_test=10, seed=1)
    b = sample_examples(pool, test_pool, "sst2", n_train=40, n_val=20, n_test=10, seed=1)
    c = sample_examples(pool, test_pool, "sst2", n_train=40, n_val=20, n_test=10, seed=2)
    assert (len(a.train), len(a.val), len(a.test)) == (40, 20, 10)
    assert a == b and a.train != c.train
    assert not {e.uid for e in a.train} & {e.uid for e in a.val}
    assert {e.uid for e in a.test} <= {e.uid for e in test_pool}
    smaller = sample_examples(pool, test_pool, "sst2", n_train=10, n_val=20, n_test=10, seed=1)
    assert smaller.val == a.val and smaller.train == a.train[:10]
    everything = sample_examples(pool, test_pool, "sst2", n_train=None, n_val=20, n_test=None, seed=1)
    assert len(everything.train) == 80 and len(everything.test) == 30


def test_sampling_warns_and_uses_what_exists():
    pool, test_pool = make_pool("copa", 400), make_pool("copa", 50)
    with pytest.warns(UserWarning) as record_:
        splits = sample_examples(pool, test_pool, "copa", n_train=500, n_val=250, n_test=500, seed=0)
    messages = [str(w.message) for w in record_]
    assert any("'copa'" in m and "500 training + 250 validation" in m and "only 400" in m for m in messages)
    assert any("'copa'" in m and "500 test" in m and "only 50" in m for m in messages)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (267, 133, 50)


@needs_data
def test_sample_tasks_from_the_shared_data():
    splits = sample_tasks(["sst2", "multirc"], data_dir=SHARED_DATA, n_train=32, n_val=16, n_test=24, seed=0)
    assert list(splits) == ["sst2", "multirc"]
    for task, split in splits.items():
        assert (len(split.train), len(split.val), len(split.test)) == (32, 16, 24)
        assert all(e.task == task for e in split.train + split.val + split.test)
        assert not {e.uid for e in split.train} & {e.uid for e in split.val}
    assert all(re.fullmatch(r"multirc/\d+/q\d+/a\d+", e.uid) for e in splits["multirc"].train)
    again = sample_task("SST-2", data_dir=SHARED_DATA, n_train=32, n_val=16, n_test=24, seed=0)
    assert again == splits["sst2"]


# ----------------------------------------------------------------------------------------------------------- metrics
def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear; THE end.") == "apple pear end"
    assert normalize_answer("theory of anarchy") == "theory of anarchy"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_token_f1_and_exact_match():
    assert token_f1("October 1973", "october 1973.") == 1.0
    assert token_f1("in October 1973", "October 1973") == pytest.approx(0.8)  # p = 2/3, r = 1
    assert token_f1("the cat", "a dog") == 0.0
    assert token_f1("", "anything") == 0.0
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)  # counts are clipped: 2 shared tokens
    assert exact_match("The Cat.", "cat") == 1.0 and exact_match("cat", "cats") == 0.0


def test_squad_f1_takes_the_best_gold_answer():
    golds = ["October 1973", "October", "1973"]
    assert squad_f1("1973", golds) == 1.0
    assert squad_f1("late October of 1973", golds) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert squad_exact_match("october", golds) == 1.0
    with pytest.raises(ValueError):
        squad_f1("x", [])


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])


# ----------------------------------------------------------------------------------------------------------- sampler
def test_sampler_balances_tasks_and_covers_each_epoch():
    pools = {"sst2": make_pool("sst2", 10), "rte": make_pool("rte", 7), "squad": make_pool("copa", 3)}
    sampler = MultiTaskSampler(pools, batch_size={"sst2": 5, "rte": 3, "squad": 2}, seed=0)
    steps = [next(sampler) for _ in range(6)]
    for step in steps:
        assert list(step) == ["sst2", "rte", "squad"]
        assert [len(b) for b in step.values()] == [5, 3, 2]
    sst2 = [e.uid for s in steps[:2] for e in s["sst2"]]
    assert sorted(sst2) == sorted(e.uid for e in pools["sst2"])  # one epoch, each example once
    rte = Counter(e.uid for s in steps for e in s["rte"])  # 18 draws over 7 examples: 2 full epochs + 4
    assert set(rte.values()) <= {2, 3} and sum(rte.values()) == 18
    assert sampler.epoch("sst2") == 3.0 and sampler.step == 6


def test_sampler_is_deterministic_reshuffles_and_resumes():
    pools = {"sst2": make_pool("sst2", 8), "rte": make_pool("rte", 8)}
    a, b, c = (MultiTaskSampler(pools, 4, seed=s) for s in (0, 0, 1))
    steps_a = [next(a) for _ in range(4)]
    assert steps_a == [next(b) for _ in range(4)]
    assert steps_a != [next(c) for _ in range(4)]
    epoch0 = [e.uid for s in steps_a[:2] for e in s["sst2"]]
    epoch1 = [e.uid for s in steps_a[2:] for e in s["sst2"]]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # a new order every epoch
    state = a.state_dict()
    json.dumps(state)
    resumed = MultiTaskSampler(pools, 4, seed=0)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(3)] == [next(a) for _ in range(3)]


def test_sampler_bad_arguments():
    pools = {"sst2": make_pool("sst2", 4), "rte": make_pool("rte", 4)}
    with pytest.raises(ValueError, match="missing"):
        MultiTaskSampler(pools, {"sst2": 2})
    with pytest.raises(ValueError, match="No training examples"):
        MultiTaskSampler({"sst2": []}, 2)
