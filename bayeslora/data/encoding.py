"""Tokenised splits, left-padded batches and loaders.

A batch is a dict: ``input_ids``/``attention_mask`` (B, T) left-padded so the last position is
every prompt's answer cue, ``labels`` (B,), ``choice_mask`` (B, K) marking the options an
example has, ``answer_ids`` (K,) the vocabulary rows of the answer tokens, ``example_ids``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError
from .tasks import Example


def answer_token_ids(tokenizer, answers: tuple[str, ...]) -> list[int]:
    """Vocabulary id of each answer string; each must encode to exactly one token."""
    ids = []
    for text in answers:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise DataError(
                f"answer label {text!r} is {len(toks)} tokens ({toks}) for tokenizer "
                f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}; the answer head needs one token "
                "per label. Fix: use a task template whose labels are single tokens for this tokenizer "
                "(letters ' A'..' E' are single tokens in most vocabularies)."
            )
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"answer labels {answers} map to repeated token ids {ids}; they must be distinct")
    return ids


@dataclass
class EncodedExample:
    id: str
    input_ids: list[int]
    label: int
    num_choices: int


class EncodedSplit(Dataset):
    """A tokenised split: prompts truncated from the left of the passage only, never past the cue."""

    def __init__(self, examples: list[Example], tokenizer, max_length: int, name: str = ""):
        if not examples:
            raise DataError(f"split {name!r} has no examples; check data.max_* settings and the data source")
        self.name = name
        self.max_length = max_length
        longest = max(examples, key=lambda e: len(e.answers))
        self.answers = longest.answers
        self.answer_ids = torch.tensor(answer_token_ids(tokenizer, self.answers), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.items = [self._encode(e, tokenizer) for e in examples]

    @property
    def num_classes(self) -> int:
        return len(self.answers)

    def _encode(self, ex: Example, tokenizer) -> EncodedExample:
        if not 0 <= ex.label < len(ex.answers):
            raise DataError(f"example {ex.id}: label {ex.label} out of range for {len(ex.answers)} choices")
        if ex.answers != self.answers[: len(ex.answers)]:
            raise DataError(f"example {ex.id}: answers {ex.answers} are not a prefix of {self.answers}")
        head = tokenizer(ex.head, add_special_tokens=True)["input_ids"]
        passage = tokenizer(ex.passage, add_special_tokens=False)["input_ids"] if ex.passage else []
        tail = tokenizer(ex.tail, add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(head) - len(tail)
        if budget < 0:
            raise DataError(
                f"example {ex.id}: the question and answer cue alone take {len(head) + len(tail)} tokens, more "
                f"than model.max_length={self.max_length}. Fix: raise model.max_length."
            )
        passage = passage[len(passage) - budget:] if len(passage) > budget else passage
        return EncodedExample(ex.id, head + passage + tail, ex.label, len(ex.answers))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EncodedExample:
        return self.items[i]

    @property
    def fingerprint(self) -> str:
        """Hash of the exact token ids, labels and answer tokens: cache keys use it."""
        h = hashlib.sha256()
        h.update(str(self.answer_ids.tolist()).encode())
        for e in self.items:
            h.update(f"{e.id}|{e.label}|{e.num_choices}|{e.input_ids}".encode())
        return h.hexdigest()[:16]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([e.label for e in self.items], dtype=torch.long)

    def collate(self, items: list[EncodedExample]) -> dict[str, torch.Tensor | list[str]]:
        width = max(len(e.input_ids) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        choice_mask = torch.zeros((len(items), self.num_classes), dtype=torch.bool)
        for row, e in enumerate(items):
            n = len(e.input_ids)
            ids[row, width - n:] = torch.tensor(e.input_ids)
            mask[row, width - n:] = 1
            choice_mask[row, : e.num_choices] = True
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([e.label for e in items], dtype=torch.long),
            "choice_mask": choice_mask,
            "answer_ids": self.answer_ids,
            "example_ids": [e.id for e in items],
        }


def fit_loaders(train: EncodedSplit, val: EncodedSplit | None, batch_size: int, eval_batch_size: int,
                seed: int) -> tuple[DataLoader, DataLoader | None]:
    """The shuffled training loader (order fixed by ``seed``) and the validation loader (None without val)."""
    val_loader = make_loader(val, eval_batch_size) if val is not None else None
    return make_loader(train, batch_size, shuffle=True, seed=seed), val_loader


def make_loader(split: EncodedSplit, batch_size: int, shuffle: bool = False, seed: int = 0,
                limit: int | None = None) -> DataLoader:
    """A loader over ``split`` (its first ``limit`` examples if given); with shuffle, the order is fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    data: Dataset = split if limit is None or limit >= len(split) else Subset(split, range(limit))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=split.collate, num_workers=0)
