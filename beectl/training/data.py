"""Training examples from a JSONL file: `{"text": ...}` (the model learns the text) or
`{"text": ..., "label": ...}` (it learns to continue the text with the label: the loss is on
the label's tokens only, followed by the end-of-sequence token)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocol.errors import BadRequestError

IGNORE = -100  # labels transformers' losses skip


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def load_examples(path: Path, tokenizer: Any, *, max_tokens: int) -> list[Example]:
    """Tokenized examples (cut to `max_tokens`); BadRequestError naming the line if the file
    is not JSONL of such objects."""
    examples = []
    eos = tokenizer.eos_token_id
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRequestError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise BadRequestError(f'{path}:{number}: expected {{"text": ...}}')
            ids = list(tokenizer(item["text"]).input_ids)
            if "label" in item:
                target = list(tokenizer(str(item["label"])).input_ids)
                target += [eos] if eos is not None else []
                labels = [IGNORE] * len(ids) + target
                ids += target
            else:
                labels = list(ids)
            if len(ids) < 2:
                raise BadRequestError(f"{path}:{number}: fewer than 2 tokens to learn from")
            examples.append(Example(ids[:max_tokens], labels[:max_tokens]))
    if not examples:
        raise BadRequestError(f"{path}: no examples")
    return examples


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask and labels ([batch, longest])."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(examples: list[Example], batch_size: int, steps: int, seed: int) -> list[list[Example]]:
    """`steps` batches, each of `batch_size` examples, by reshuffled passes over the data."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        batch = []
        for _ in range(min(batch_size, len(examples))):
            if not order:
                order = torch.randperm(len(examples), generator=generator).tolist()
            batch.append(examples[order.pop()])
        out.append(batch)
    return out
