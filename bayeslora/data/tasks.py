"""Tasks: turn a dataset row (in its Hugging Face hub schema) into a prompt, answer options and a label.

Prompts follow the Robeyns et al. style (docs/benchmarking.md, offline assets and protocol)::

    Return the label of the correct answer for the question below.

    Question: {q}
    Choices:
    A) {c1}
    B) {c2}
    Answer:

SST-2 uses answer-text scoring on a plain review prompt (see :func:`sst2_row`). A prompt is kept
in three pieces so truncation can only ever remove the start of the passage
(BoolQ) and never the answer cue: ``head`` (instruction), ``passage`` (truncatable) and ``tail``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError

INSTRUCTION = "Return the label of the correct answer for the question below.\n\n"
LETTERS = "ABCDE"


@dataclass(frozen=True)
class Example:
    """One classification example: the prompt pieces, the K answer strings and the label index."""

    id: str
    head: str
    passage: str
    tail: str
    answers: tuple[str, ...]
    label: int

    @property
    def prompt(self) -> str:
        return self.head + self.passage + self.tail


def _choices_block(texts: list[str]) -> str:
    return "Choices:\n" + "".join(f"{LETTERS[i]}) {t}\n" for i, t in enumerate(texts))


def _mc_example(ex_id: str, question: str, texts: list[str], label: int) -> Example:
    if not 2 <= len(texts) <= len(LETTERS):
        raise DataError(f"example {ex_id}: {len(texts)} choices; tasks support 2..{len(LETTERS)}")
    tail = f"Question: {question.strip()}\n{_choices_block([t.strip() for t in texts])}Answer:"
    return Example(ex_id, INSTRUCTION, "", tail, tuple(f" {LETTERS[i]}" for i in range(len(texts))), label)


def integer_label(value: Any, field_name: str, ex_id: str) -> int:
    """``value`` as a class index: an integer, an integral float or a string of digits; anything else
    (1.7, "yes", true) is a DataError naming the field."""
    if isinstance(value, bool):
        raise DataError(f"example {ex_id}: {field_name} must be an integer class index, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DataError(f"example {ex_id}: {field_name} must be an integer class index, got {value!r}")


def boolean_answer(value: Any, ex_id: str) -> int:
    """BoolQ's answer as a class: true/false (bool, 0/1, or the strings) -> 1/0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    label = integer_label(value, "answer", ex_id)
    if label not in (0, 1):
        raise DataError(f"example {ex_id}: answer must be true or false (or 1/0), got {value!r}")
    return label


def _answer_index(key: str, labels: list[str], ex_id: str) -> int:
    if key not in labels:
        raise DataError(f"example {ex_id}: answer key {key!r} is not among the choice labels {labels}")
    return labels.index(key)


def arc_row(row: dict[str, Any], idx: int) -> Example:
    """ai2_arc schema: id, question, choices{text,label}, answerKey."""
    labels = list(row["choices"]["label"])
    return _mc_example(row["id"], row["question"], list(row["choices"]["text"]),
                       _answer_index(row["answerKey"], labels, row["id"]))


def obqa_row(row: dict[str, Any], idx: int) -> Example:
    """openbookqa schema: id, question_stem, choices{text,label}, answerKey."""
    labels = list(row["choices"]["label"])
    return _mc_example(row["id"], row["question_stem"], list(row["choices"]["text"]),
                       _answer_index(row["answerKey"], labels, row["id"]))


def mmlu_row(row: dict[str, Any], idx: int) -> Example:
    """cais/mmlu schema: question, subject, choices (list), answer (int)."""
    ex_id = f"{row.get('subject', 'mmlu')}-{idx}"
    return _mc_example(ex_id, row["question"], list(row["choices"]), integer_label(row["answer"], "answer", ex_id))


def winogrande_row(row: dict[str, Any], idx: int) -> Example:
    """winogrande schema: sentence (with '_'), option1, option2, answer ('1'/'2')."""
    ex_id = str(row.get("id", f"wg-{idx}"))
    question = f"Which option correctly fills the blank (_)? {row['sentence']}"
    return _mc_example(ex_id, question, [row["option1"], row["option2"]],
                       integer_label(row["answer"], "answer", ex_id) - 1)


def boolq_row(row: dict[str, Any], idx: int) -> Example:
    """google/boolq schema: question, answer (bool), passage. Classes: 0 = false, 1 = true."""
    ex_id = str(row.get("id", f"boolq-{idx}"))
    question = row["question"].strip().rstrip("?") + "?"
    return Example(ex_id, INSTRUCTION + "Passage: ", row["passage"].strip(),
                   f"\nQuestion: {question}\nAnswer (true or false):", (" false", " true"),
                   boolean_answer(row["answer"], ex_id))


def sst2_row(row: dict[str, Any], idx: int) -> Example:
    """glue/sst2 schema: sentence, label (0 negative, 1 positive), idx.

    Answer-text scoring with a plain "Review: ... Sentiment:" prompt: on SmolLM2-135M it scores 0.83
    zero-shot, where the instruction-style prompt sits at chance (measured on 96 test sentences).
    """
    ex_id = f"sst2-{row.get('idx', idx)}"
    return Example(ex_id, "Review: ", row["sentence"].strip(), "\nSentiment:", (" negative", " positive"),
                   integer_label(row["label"], "label", ex_id))


def sst2_as_boolq_row(row: dict[str, Any], idx: int) -> Example:
    """An SST-2 sentence in BoolQ's prompt and answer words: a shifted input distribution (one-line
    movie reviews instead of Wikipedia passages, one fixed question) for models fine-tuned on BoolQ.
    Classes as BoolQ's: 0 = false (negative review), 1 = true (positive review)."""
    ex_id = f"sst2-as-boolq-{row.get('idx', idx)}"
    return Example(ex_id, INSTRUCTION + "Passage: ", row["sentence"].strip(),
                   "\nQuestion: is this movie review positive?\nAnswer (true or false):", (" false", " true"),
                   integer_label(row["label"], "label", ex_id))


def news_as_sst2_row(row: dict[str, Any], idx: int) -> Example:
    """glue/mrpc schema (sentence1 is used): a news sentence in SST-2's review prompt and answer words,
    an input shift with the in-distribution task's answers, for OOD detection. It has no sentiment
    label: the task is unlabelled (label 0 is a placeholder; label-based metrics are not reported)."""
    ex_id = f"news-as-sst2-{row.get('idx', idx)}"
    return Example(ex_id, "Review: ", row["sentence1"].strip(), "\nSentiment:", (" negative", " positive"), 0)


@dataclass(frozen=True)
class TaskSpec:
    """A named task: how to read a row, how many answer options, and where its data lives.

    ``hub``: (path, config, {our split: hub split}); ``offline``: how the bundled copy is split
    (see :mod:`bayeslora.data.sources`); ``labelled``: False for an OOD detection set whose examples have
    no label for the task's answers (only label-free metrics, entropy, MI and OOD AUROC, are reported).
    """

    name: str
    to_example: Callable[[dict[str, Any], int], Example]
    num_classes: int
    hub: tuple[str, str | None, dict[str, str]]
    offline: dict[str, Any]
    template: str = "robeyns"
    labelled: bool = True


_HUB_STD = {"train": "train", "val": "validation", "test": "test"}
_HUB_NO_TEST = {"train": "train", "test": "validation"}  # hub test labels are hidden

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("arc_easy", arc_row, 5, ("allenai/ai2_arc", "ARC-Easy", _HUB_STD),
                 {"train": ("requests", "arc_easy"), "test": ("disk", "ai2_arc/ARC-Easy/validation")}),
        TaskSpec("arc_challenge", arc_row, 5, ("allenai/ai2_arc", "ARC-Challenge", _HUB_STD),
                 {"train": ("requests", "arc_challenge"), "test": ("disk", "ai2_arc/ARC-Challenge/validation")}),
        TaskSpec("obqa", obqa_row, 4, ("allenai/openbookqa", "main", _HUB_STD),
                 {"train": ("requests", "openbookqa"), "test": ("disk", "openbookqa/main/validation")}),
        TaskSpec("wg_s", winogrande_row, 2, ("allenai/winogrande", "winogrande_s", _HUB_NO_TEST),
                 {"pool": ("disk", "winogrande/winogrande_xl/validation"), "max_train": 640}),
        TaskSpec("wg_m", winogrande_row, 2, ("allenai/winogrande", "winogrande_m", _HUB_NO_TEST),
                 {"pool": ("disk", "winogrande/winogrande_xl/validation"), "max_train": 2558}),
        TaskSpec("boolq", boolq_row, 2, ("google/boolq", None, {"train": "train", "test": "validation"}),
                 {"pool": ("disk", "boolq/none/validation")}),
        TaskSpec("sst2", sst2_row, 2, ("nyu-mll/glue", "sst2", {"train": "train", "test": "validation"}),
                 {"pool": ("disk", "glue/sst2/validation")}, template="review-sentiment"),
        TaskSpec("sst2_as_boolq", sst2_as_boolq_row, 2,
                 ("nyu-mll/glue", "sst2", {"train": "train", "test": "validation"}),
                 {"pool": ("disk", "glue/sst2/validation")}, template="robeyns-boolq-passage"),
        TaskSpec("news_as_sst2", news_as_sst2_row, 2,
                 ("nyu-mll/glue", "mrpc", {"train": "train", "test": "validation"}),
                 {"pool": ("disk", "glue/mrpc/validation")}, template="review-sentiment", labelled=False),
        TaskSpec("mmlu_college_chemistry", mmlu_row, 4, ("cais/mmlu", "college_chemistry",
                 {"train": "dev", "val": "validation", "test": "test"}),
                 {"train": ("disk", "hails/mmlu_no_train/college_chemistry/dev"),
                  "test": ("disk", "hails/mmlu_no_train/college_chemistry/test")}),
        TaskSpec("mmlu_college_physics", mmlu_row, 4, ("cais/mmlu", "college_physics",
                 {"train": "dev", "val": "validation", "test": "test"}),
                 {"train": ("disk", "hails/mmlu_no_train/college_physics/dev"),
                  "test": ("disk", "hails/mmlu_no_train/college_physics/test")}),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"unknown dataset {name!r}. Known datasets: {', '.join(sorted(TASKS))}")
    return TASKS[name]
