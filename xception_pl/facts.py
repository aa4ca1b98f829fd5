"""The facts of the data that the model is built with, declared once."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DataFacts(Protocol):
    """What a data module declares for the model: the CLI links each `data.<fact>` to `model.<fact>` (checked by
    `data_fact`), so a fact is written once, in the data config (or read from the shards' manifest). Our data
    modules subclass it; another data module needs only the four attributes."""

    num_classes: int  # outputs of the classifier
    multilabel: bool  # multi-hot targets (JFT) or one class per image (ImageNet)
    train_size: int | None  # training samples per epoch, for epoch-based lr decay; None without train data
    batch_size: int  # samples per batch, per device


DATA_FACTS = tuple(DataFacts.__annotations__)
TYPES: dict[str, tuple[type, ...]] = {"num_classes": (int,), "multilabel": (bool,), "train_size": (int, type(None)),
                                      "batch_size": (int,)}


def data_fact(data: Any, name: str) -> Any:
    """`data.<name>`, checked: a data module that does not declare it, or declares the wrong kind, stops the run
    naming the fact and what the model needs."""
    if not hasattr(data, name):
        raise ValueError(f"{type(data).__name__} has no `{name}`: a data module for XceptionModule declares "
                         f"xception_pl.facts.DataFacts ({', '.join(DATA_FACTS)}) as attributes")
    value = getattr(data, name)
    if isinstance(value, bool) and bool not in TYPES[name] or not isinstance(value, TYPES[name]):
        raise ValueError(f"{type(data).__name__}.{name} = {value!r}: xception_pl.facts.DataFacts needs "
                         f"{' or '.join(t.__name__ for t in TYPES[name])}")
    if name in ("num_classes", "batch_size") and value < 1:
        raise ValueError(f"{type(data).__name__}.{name} = {value}: must be at least 1")
    return value
