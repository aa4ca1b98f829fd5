"""The facts of the data that the model is built with, declared once."""

from __future__ import annotations

from typing import Protocol


class DataFacts(Protocol):
    """What a data module exposes for the model: the CLI links each `data.<fact>` to `model.<fact>`, so a
    fact is written once, in the data config (or read from the shards' manifest)."""

    num_classes: int  # outputs of the classifier
    multilabel: bool  # multi-hot targets (JFT) or one class per image (ImageNet)
    train_size: int | None  # training samples per epoch, for epoch-based lr decay; None without train data
    batch_size: int  # samples per batch, per device


DATA_FACTS = tuple(DataFacts.__annotations__)
