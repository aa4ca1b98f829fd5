"""Labels for the shard writer: class folders, CSV label files (ours and ILSVRC2012's), class lists.

    SRC/<class>/<image>                       class folders (ImageNet train as extracted)
    SRC/<image> + labels.csv                  `path,label`: label a class name or a class id
    SRC/<image> + LOC_val_solution.csv        ILSVRC2012 validation as published (Kaggle): `ImageId,PredictionString`,
                                              the synset is the first word of PredictionString
    --classes manifest.json | names.txt       fixes the class ids (another split's manifest, or one name a line)
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LOC_HEADER = ["ImageId", "PredictionString"]
Item = tuple[str, str, int]  # (key, path, class id)


def sample_key(relative: Path) -> str:
    # webdataset splits a member name at the first dot of its base name: no dots in keys
    return re.sub(r"[^A-Za-z0-9_/-]", "_", relative.with_suffix("").as_posix()).lstrip("_/") or "sample"


def images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def read_classes(path: str) -> list[str]:
    """Class names in id order: from a manifest.json's class_names or a text file of one name a line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--classes {path} does not exist: give the training split's manifest.json or a "
                                "text file with one class name a line")
    if file.suffix == ".json":
        names = json.loads(file.read_text()).get("class_names")
        if not names:
            raise ValueError(f"--classes {path}: this manifest has no class_names (written from ids alone); "
                             "give a text file with one class name a line")
    else:
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise ValueError(f"--classes {path}: {'duplicate names ' + str(duplicates[:5]) if names else 'no names'}")
    return names


def class_id(label: str, classes: list[str] | None, where: str, source: str) -> int:
    """The id of `label` (a class name, or a class id when it is a number)."""
    if classes is not None and label in classes:
        return classes.index(label)
    if label.isdigit() and (classes is None or int(label) < len(classes)):
        return int(label)
    raise ValueError(f"{where}: class {label!r} is not in --classes {source} (a class of this split that the "
                     "training split lacks); write this split with the training split's manifest.json as --classes")


def folder_items(root: Path, classes_file: str | None = None) -> tuple[list[Item], list[str]]:
    """ImageNet layout: one subfolder per class; ids in sorted folder order, or the order of --classes."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ValueError(f"--source {root}: no class subfolders (expected SRC/<class>/<image>, or pass --labels "
                         "FILE for a flat folder)")
    names = read_classes(classes_file) if classes_file else folders
    items = [(sample_key(path.relative_to(root)), str(path), class_id(name, names, f"{root / name}", classes_file))
             for name in folders for path in images_under(root / name)]
    return items, names


def csv_items(root: Path, labels_file: str, classes_file: str | None = None,
              num_classes: int | None = None) -> tuple[list[Item], list[str] | None, int]:
    """A flat image folder and a CSV label file -> (items, class names or None, num_classes).

    Class names: --classes, else the sorted label names; labels that are all numbers are class ids."""
    file = Path(labels_file).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--labels {labels_file} does not exist")
    with open(file, newline="") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), 1) if row and any(cell.strip() for cell in row)]
    ilsvrc = bool(rows) and [c.strip() for c in rows[0][1]] == LOC_HEADER
    if rows and (ilsvrc or [c.strip().lower() for c in rows[0][1]] == ["path", "label"]):
        rows = rows[1:]
    by_stem = {p.stem: p for p in images_under(root)} if ilsvrc else {}
    records, missing = [], []
    for n, row in rows:
        if len(row) < 2 or not row[1].strip():
            raise ValueError(f"{file}:{n}: expected `path,label` (or ILSVRC's `ImageId,PredictionString`), got {row}")
        name, label = row[0].strip(), row[1].split()[0]  # ILSVRC: the synset is the first word of the boxes
        path = by_stem.get(name) if ilsvrc else root / name
        if path is None or not path.is_file():
            missing.append(f"{file.name}:{n}: {name}")
            continue
        records.append((n, path, label))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images named in --labels {labels_file} are not under --source {root},"
                                f" e.g. {missing[:3]}; fix the labels file or point --source at the images")
    if not records:
        raise ValueError(f"--labels {labels_file}: no labelled images")
    if classes_file:
        names: list[str] | None = read_classes(classes_file)
    elif all(label.isdigit() for _, _, label in records):
        names = None
    else:
        names = sorted({label for _, _, label in records})
    items = [(sample_key(path.relative_to(root)), str(path), class_id(label, names, f"{file}:{n}", classes_file))
             for n, path, label in records]
    top = max(label for _, _, label in items)
    num_classes = len(names) if names is not None else num_classes if num_classes is not None else top + 1
    if top >= num_classes:
        raise ValueError(f"{file}: class id {top} >= num_classes={num_classes}; raise --num_classes or fix the labels")
    return items, names, num_classes
