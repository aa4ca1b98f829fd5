"""Shard lists and dataset facts from a shard directory (manifest.json), a brace pattern or a URL.

Everything here runs in the main process at construction time, so a wrong path fails before any
worker or DDP process starts, with a message that names the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

MANIFEST = "manifest.json"
SHARDS_COMMAND = "python -m xception_pl shards --source SRC --output DIR"


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    size: int | None  # samples
    manifest: dict[str, Any] | None


def read_manifest(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec and not spec.startswith("file://")


def resolve(spec: str, size: int | None, name: str) -> ShardSet:
    """`spec` (for the `name` split): a shard directory, a local brace pattern, or a remote URL/pipe."""
    if is_remote(spec):
        if size is None:
            raise ValueError(f"{name}={spec!r} is remote, so its sample count is unknown: pass {name}_size=<samples>")
        return ShardSet(list(braceexpand.braceexpand(spec)), size, None)
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{name}={spec!r}: no {MANIFEST} in this directory. Write shards with `{SHARDS_COMMAND}`, or "
                f"pass a brace pattern such as {path}/train-{{000000..000009}}.tar together with {name}_size")
        manifest = read_manifest(path / MANIFEST)
        counts = {s["name"]: s["count"] for s in manifest["shards"]}
        missing = [n for n in counts if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{name}={spec!r}: {len(missing)} shards listed in {MANIFEST} are missing, e.g. "
                                    f"{missing[:3]}; rewrite the shards with `{SHARDS_COMMAND}`")
        return ShardSet([str(path / n) for n in counts], size if size is not None else sum(counts.values()), manifest)
    urls = list(braceexpand.braceexpand(str(path)))
    missing = [u for u in urls if not os.path.isfile(u)]
    if len(missing) == len(urls):
        raise FileNotFoundError(f"{name}={spec!r} matches no shard file. Give a shard directory with a {MANIFEST} "
                                f"(written by `{SHARDS_COMMAND}`) or a brace pattern of existing .tar files")
    if missing:
        raise FileNotFoundError(f"{name}={spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. "
                                f"{missing[:3]}; fix the brace range")
    manifest_path = Path(urls[0]).parent / MANIFEST
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    if size is None and manifest is not None:
        counts = {s["name"]: s["count"] for s in manifest["shards"]}
        if all(Path(u).name in counts for u in urls):
            size = sum(counts[Path(u).name] for u in urls)
    if size is None:
        raise ValueError(f"{name}={spec!r} has no {MANIFEST} beside it that lists these shards, so its sample "
                         f"count is unknown: pass {name}_size=<samples>")
    return ShardSet(urls, size, manifest)


def dataset_facts(sets: dict[str, ShardSet], num_classes: int | None,
                  multilabel: bool | None) -> tuple[int, bool, list[str] | None]:
    """(num_classes, multilabel, class_names) from the manifests, checked against each other and the args."""
    facts: dict[str, Any] = {"num_classes": num_classes, "multilabel": multilabel}
    class_names, named_by = None, None
    for name, shard_set in sets.items():
        if shard_set.manifest is None:
            continue
        for fact, value in facts.items():
            found = shard_set.manifest[fact]
            if value is not None and found != value:
                raise ValueError(f"{fact}={value} (an argument or another split's manifest) disagrees with "
                                 f"{fact}={found} in the {MANIFEST} of {name}; drop the argument or fix the paths")
            facts[fact] = found
        names = shard_set.manifest.get("class_names")
        if names is not None and class_names is not None and names != class_names:
            raise ValueError(class_names_differ(named_by, class_names, name, names))
        if names is not None and class_names is None:
            class_names, named_by = names, name
    for fact, value in facts.items():
        if value is None:
            raise ValueError(f"{fact} is unknown: no {MANIFEST} beside the shards; pass {fact}=... explicitly")
    return facts["num_classes"], facts["multilabel"], class_names


def class_names_differ(first: str, first_names: list[str], second: str, second_names: list[str]) -> str:
    """One line naming the first class id whose name differs between two splits' manifests."""
    i = next((i for i, (a, b) in enumerate(zip(first_names, second_names)) if a != b),
             min(len(first_names), len(second_names)))
    a = first_names[i] if i < len(first_names) else "(none)"
    b = second_names[i] if i < len(second_names) else "(none)"
    return (f"the {MANIFEST} of {first} and {second} name different classes: class id {i} is {a!r} in {first} but "
            f"{b!r} in {second} ({len(first_names)} vs {len(second_names)} classes). Rewrite {second}'s shards with "
            f"`--classes <{first} dir>/{MANIFEST}` so the ids agree")
