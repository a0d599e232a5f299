"""Prompt formats of MAZO_SPEC §5 (MeZO's templates): one pure function per task, from a record to examples.

Every function takes one record in the dataset's original field names (see `../shared/data/SOURCES.md`) and the
identifier to give its examples, and returns a list of `Example` (one, except MultiRC: one per answer option).
Label values are accepted in both the JSON Lines form (`true` / `"entailment"`) and the Hugging Face hub form
(`1` / `0`); anything else raises `ValueError` naming the field, which the loader turns into an error naming the
file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._checks import is_int
from .example import Example


Record = Mapping[str, Any]
Renderer = Callable[[Record, str], list[Example]]

YES_NO = ("Yes", "No")  # label 0 = yes (true / entailment), 1 = no
NO_YES = ("No", "Yes")  # label 0 = no (false), 1 = yes

# Fields each task's template reads; "[]" means every element of a list. Checked before anything is rendered.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence", "label"),
    "boolq": ("passage", "question", "label"),
    "rte": ("premise", "hypothesis", "label"),
    "wsc": ("text", "target", "target.span1_text", "target.span2_text", "label"),
    "wic": ("word", "sentence1", "sentence2", "label"),
    "multirc": (
        "passage",
        "passage.text",
        "passage.questions",
        "passage.questions[].question",
        "passage.questions[].answers",
        "passage.questions[].answers[].text",
        "passage.questions[].answers[].label",
    ),
    "copa": ("premise", "choice1", "choice2", "question", "label"),
    "squad": ("title", "context", "question", "answers", "answers.text"),
}


def bool_label(value: Any, field: str = "label") -> bool:
    """Parses a boolean label: JSON `true` / `false`, or the hub's `1` / `0`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"field '{field}' must be true or false (or 1 / 0), got {value!r}")


def int_label(value: Any, allowed: tuple[int, ...], field: str = "label") -> int:
    """Parses an integer class label that must be one of `allowed`."""
    if is_int(value) and value in allowed:
        return value
    raise ValueError(f"field '{field}' must be one of {list(allowed)}, got {value!r}")


def rte_label(value: Any) -> int:
    """RTE label index: 0 = entailment, 1 = not_entailment (string form of the JSON files or the hub's 0 / 1)."""
    names = {"entailment": 0, "not_entailment": 1}
    if isinstance(value, str) and value in names:
        return names[value]
    if is_int(value) and value in (0, 1):
        return value
    raise ValueError(f"field 'label' must be 'entailment' or 'not_entailment' (or 0 / 1), got {value!r}")


def _text(record: Record, field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"field '{field}' must be a string, got {type(value).__name__}")
    return value


def render_sst2(record: Record, uid: str) -> list[Example]:
    """SST-2: `{sentence} It was` → ` terrible` (0) / ` great` (1)."""
    prompt = f"{_text(record, 'sentence')} It was"
    return [Example("sst2", prompt, (" terrible", " great"), int_label(record["label"], (0, 1)), uid=uid)]


def render_boolq(record: Record, uid: str) -> list[Example]:
    """BoolQ: `{passage} {Question}\\n` (first letter upper-cased, `?` appended if missing) → `Yes` / `No`."""
    question = _text(record, "question")
    if question:
        question = question[0].upper() + question[1:]
    if not question.endswith("?"):
        question += "?"
    prompt = f"{_text(record, 'passage')} {question}\n"
    label = 0 if bool_label(record["label"]) else 1
    return [Example("boolq", prompt, YES_NO, label, uid=uid)]


def render_rte(record: Record, uid: str) -> list[Example]:
    """RTE: `{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?\\n` → `Yes` (entailment) / `No`."""
    prompt = f'{_text(record, "premise")}\nDoes this mean that "{_text(record, "hypothesis")}" is true? Yes or No?\n'
    return [Example("rte", prompt, YES_NO, rte_label(record["label"]), uid=uid)]


def render_wsc(record: Record, uid: str) -> list[Example]:
    """WSC: `{text}\\nIn the previous sentence, does the pronoun "{span2 lower}" refer to {span1}? Yes or No?\\n`."""
    target = record["target"]
    if not isinstance(target, Mapping):
        raise ValueError(f"field 'target' must be an object with span1_text and span2_text, got {target!r}")
    span1, span2 = _text(target, "span1_text"), _text(target, "span2_text")
    prompt = (
        f'{_text(record, "text")}\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? '
        "Yes or No?\n"
    )
    return [Example("wsc", prompt, NO_YES, int(bool_label(record["label"])), uid=uid)]


def render_wic(record: Record, uid: str) -> list[Example]:
    """WiC: `Does the word "{word}" have the same meaning in these two sentences? Yes, No?\\n{s1}\\n{s2}\\n`."""
    prompt = (
        f'Does the word "{_text(record, "word")}" have the same meaning in these two sentences? Yes, No?\n'
        f"{_text(record, 'sentence1')}\n{_text(record, 'sentence2')}\n"
    )
    return [Example("wic", prompt, NO_YES, int(bool_label(record["label"])), uid=uid)]


def render_multirc(record: Record, uid: str) -> list[Example]:
    """MultiRC: one example per answer option of every question of the passage.

    `{paragraph}\\nQuestion: {question}\\nI found this answer "{answer}". Is that correct? Yes or No?\\n` → `No` (0)
    / `Yes` (1). The uid of option `a` of question `q` is `{uid}/q{q}/a{a}` (list positions, not the `idx` fields).
    """
    passage = record["passage"]
    paragraph = _text(passage, "text")
    examples = []
    for q_pos, question in enumerate(passage["questions"]):
        q_text = _text(question, "question")
        for a_pos, answer in enumerate(question["answers"]):
            prompt = (
                f'{paragraph}\nQuestion: {q_text}\nI found this answer "{_text(answer, "text")}". '
                "Is that correct? Yes or No?\n"
            )
            label = int(bool_label(answer["label"], f"passage.questions[{q_pos}].answers[{a_pos}].label"))
            examples.append(Example("multirc", prompt, NO_YES, label, uid=f"{uid}/q{q_pos}/a{a_pos}"))
    return examples


def _copa_choice(choice: str) -> str:
    """The first word lower-cased unless it is `I` (MeZO's "correct" capitalisation)."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def render_copa(record: Record, uid: str) -> list[Example]:
    """COPA: `{premise without its final "."}` + ` so ` (effect) / ` because ` (cause) → the two choices."""
    premise = _text(record, "premise").rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    question = record["question"]
    if question not in ("cause", "effect"):
        raise ValueError(f"field 'question' must be 'cause' or 'effect', got {question!r}")
    prompt = premise + (" so " if question == "effect" else " because ")
    candidates = (_copa_choice(_text(record, "choice1")), _copa_choice(_text(record, "choice2")))
    return [Example("copa", prompt, candidates, int_label(record["label"], (0, 1)), uid=uid)]


def render_squad(record: Record, uid: str) -> list[Example]:
    """SQuAD: `Title: {title}\\nContext: {context}\\nQuestion: {question}\\nAnswer:`; gold answers kept in order."""
    answers = record["answers"]["text"]
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"field 'answers.text' must be a non-empty list of strings, got {answers!r}")
    prompt = (
        f"Title: {_text(record, 'title')}\nContext: {_text(record, 'context')}\n"
        f"Question: {_text(record, 'question')}\nAnswer:"
    )
    return [Example("squad", prompt, answers=tuple(answers), uid=uid)]


RENDERERS: dict[str, Renderer] = {
    "sst2": render_sst2,
    "boolq": render_boolq,
    "rte": render_rte,
    "wsc": render_wsc,
    "wic": render_wic,
    "multirc": render_multirc,
    "copa": render_copa,
    "squad": render_squad,
}


# The shortest record of each task: every text field one character ("x"), the label valid. Its rendering is the
# template's own text around the shortest content, so its token count is the least `max_length` that holds the template
# and the answer (`encoding.minimum_length`); any real example is at least that long.
_X = "x"
SKELETONS: dict[str, Record] = {
    "sst2": {"sentence": _X, "label": 0},
    "boolq": {"passage": _X, "question": _X, "label": True},
    "rte": {"premise": _X, "hypothesis": _X, "label": "entailment"},
    "wsc": {"text": _X, "target": {"span1_text": _X, "span2_text": _X}, "label": True},
    "wic": {"word": _X, "sentence1": _X, "sentence2": _X, "label": True},
    "multirc": {"passage": {"text": _X, "questions": [{"question": _X, "answers": [{"text": _X, "label": True}]}]}},
    "copa": {"premise": _X, "choice1": _X, "choice2": _X, "question": "cause", "label": 0},
    "squad": {"title": _X, "context": _X, "question": _X, "answers": {"text": [_X]}},
}
