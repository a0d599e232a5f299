"""The unit every other module of the task suite works on: one prompt with its candidates or gold answers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One scored instance of a task, already rendered with the prompt format of MAZO_SPEC §5.

    Classification and multiple choice examples carry `candidates` (continuations appended directly to `prompt`,
    in label order) and the index `label` of the gold one. Generation examples (SQuAD) carry no candidates and the
    gold `answers` instead; the first answer is the teacher-forcing target.

    Args:
        task (`str`): canonical task name, e.g. `"sst2"`.
        prompt (`str`): the prompt string.
        candidates (`tuple[str, ...]`): candidate continuations; empty for generation tasks.
        label (`int`, *optional*): index of the gold candidate; `None` for generation tasks.
        answers (`tuple[str, ...]`): gold answers of a generation task (at least one); empty otherwise.
        uid (`str`): where the example comes from, e.g. `"multirc/3/q2/a1"` (passage 3, question 2, option 1).
    """

    task: str
    prompt: str
    candidates: tuple[str, ...] = ()
    label: int | None = None
    answers: tuple[str, ...] = ()
    uid: str = ""

    def __post_init__(self) -> None:
        if self.candidates:
            if self.label is None or not 0 <= self.label < len(self.candidates):
                raise ValueError(
                    f"Example {self.uid or self.prompt[:40]!r}: label {self.label!r} is not an index into its "
                    f"{len(self.candidates)} candidates."
                )
        elif not self.answers:
            raise ValueError(f"Example {self.uid or self.prompt[:40]!r} has neither candidates nor gold answers.")

    @property
    def is_generation(self) -> bool:
        """Whether the example is scored by generation (no candidates) rather than by candidate ranking."""
        return not self.candidates

    @property
    def target(self) -> str:
        """The gold continuation: the gold candidate, or `" {first gold answer}\\n"` for a generation task."""
        if self.candidates:
            return self.candidates[self.label]  # type: ignore[index]
        return f" {self.answers[0]}\n"
