"""Shard lists and dataset facts from a shard directory (manifest.json), a brace pattern, their URL on an object
store (s3://bucket/train, s3://bucket/train-{000000..000099}.tar: xception_pl.storage) or a `pipe:` command.

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

from xception_pl import storage

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
    return spec.startswith("pipe:") or storage.is_url(spec)


def resolve(spec: str, size: int | None, name: str, storage_options: dict[str, Any] | None = None) -> ShardSet:
    """`spec` (for the `name` split): a shard directory, a local brace pattern, either on an object store, or a
    `pipe:` command."""
    if spec.startswith("pipe:"):
        if size is None:
            raise ValueError(f"{name}={spec!r} is remote, so its sample count is unknown: pass {name}_size=<samples>")
        return ShardSet(list(braceexpand.braceexpand(spec)), size, None)
    if storage.is_url(spec):
        return resolve_url(spec, size, name, storage_options)
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


def resolve_url(spec: str, size: int | None, name: str, storage_options: dict[str, Any] | None) -> ShardSet:
    """As a local directory or brace pattern, on an object store: one listing per directory checks that every
    shard is there; the manifest is read from the directory (or beside the first shard)."""
    urls = list(braceexpand.braceexpand(spec))
    directory = len(urls) == 1 and not spec.endswith(".tar")
    storage.reachable(urls[0] if not directory else f"{spec.rstrip('/')}/{MANIFEST}", storage_options,
                      what=f"{name}={spec!r}:")
    fs, _ = storage.filesystem(spec, storage_options)
    folder = spec.rstrip("/") if directory else urls[0].rsplit("/", 1)[0]
    manifest_url = f"{folder}/{MANIFEST}"
    manifest = json.loads(storage.read_bytes(manifest_url, storage_options)) if fs.exists(manifest_url) else None
    counts = {s["name"]: s["count"] for s in manifest["shards"]} if manifest else {}
    if directory:
        urls = [f"{folder}/{n}" for n in counts]
    listed = {}
    for parent in {u.rsplit("/", 1)[0] for u in urls}:
        listed[parent] = {p.rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False)}
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in listed[u.rsplit("/", 1)[0]]]
    if missing:
        raise FileNotFoundError(f"{name}={spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. "
                                f"{missing[:3]}; fix the brace range, or upload the shards again")
    if size is None and urls and all(u.rsplit("/", 1)[-1] in counts for u in urls):
        size = sum(counts[u.rsplit("/", 1)[-1]] for u in urls)
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
