"""Data that is not clean: `kd2deploy data check` and the training side's tolerance of unreadable images.

- **`kd2deploy data check RECIPE|DIR`** decodes every file of an ImageFolder tree (train/ and val/, or one tree) in
  parallel processes and reports unreadable or truncated images, files that are not images (`.DS_Store`,
  `Thumbs.db`, notes), images in modes other than RGB (greyscale, CMYK, RGBA, 16-bit, palette: training converts
  them to RGB, so they are listed, not errors), empty class folders, and train/val class sets that differ.
- **Training** never crashes on one bad file (`folders.TolerantImageFolder`). Before the first step it reads every
  image's header (fast: no decoding) and leaves out the files that cannot be opened; a file that opens but fails to
  decode later (a truncated JPEG) is replaced by the next image of the folder for that step. The run prints one
  warning naming the first few and the count, and lists them in the run folder's `skipped_images.txt`. More than
  `data.max_bad_fraction` unreadable images in a folder stops the run with exit 2 before the first step.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .valset import IMG_EXTENSIONS

SKIPPED_FILE = "skipped_images.txt"
DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what PIL raises for corrupt, truncated or foreign files


def header_problem(path: str) -> str | None:
    """Why PIL cannot even open `path` (reads the header only), or None."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path):
            return None
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"


def decode_problem(path: str) -> tuple[str | None, str | None]:
    """(why `path` cannot be decoded, its mode when that is not RGB): a full decode, as training does."""
    problem = header_problem(path)
    if problem:
        return problem, None
    try:
        with Image.open(path) as image:
            image.load()
            return None, None if image.mode == "RGB" else image.mode
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}", None


def _decode_chunk(paths: Sequence[str]) -> list[tuple[str | None, str | None]]:
    return [decode_problem(p) for p in paths]


@dataclass
class TreeReport:
    """What `data check` found in one ImageFolder tree."""

    root: Path
    classes: list[str] = field(default_factory=list)
    images: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    not_images: list[str] = field(default_factory=list)
    odd_modes: dict[str, list[str]] = field(default_factory=dict)  # mode -> paths
    empty_classes: list[str] = field(default_factory=list)

    def problems(self) -> int:
        return len(self.unreadable) + len(self.not_images) + len(self.empty_classes)


def list_tree(root: Path) -> tuple[list[str], list[tuple[str, str]], list[str], list[str]]:
    """(classes, [(image path, class)], non-image files, empty class folders) of an ImageFolder tree, in
    torchvision's order."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    images, others, empty = [], [], []
    for name in classes:
        count = 0
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                path = os.path.join(folder, file)
                if file.lower().endswith(IMG_EXTENSIONS):
                    images.append((path, name))
                    count += 1
                else:
                    others.append(path)
        if count == 0:
            empty.append(name)
    others += sorted(str(root / e.name) for e in os.scandir(root) if e.is_file())  # stray files beside the classes
    return classes, images, others, empty


def check_tree(root: Path, workers: int, progress: Callable[[int, int], None] | None = None) -> TreeReport:
    """Decode every image of the tree at `root` in `workers` processes; `progress(done, total)` after each chunk."""
    if not root.is_dir():
        raise UserError(f"{root} does not exist or is not a folder. Give a folder with one sub-folder per class "
                        "(ImageFolder layout), or a recipe whose data.root holds train/ and val/.")
    classes, images, others, empty = list_tree(root)
    report = TreeReport(root, classes, len(images), not_images=others, empty_classes=empty)
    paths = [p for p, _ in images]
    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    done = 0
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk, results in zip(chunks, pool.map(_decode_chunk, chunks), strict=True):
            for path, (problem, mode) in zip(chunk, results, strict=True):
                if problem:
                    report.unreadable.append((path, problem))
                elif mode:
                    report.odd_modes.setdefault(mode, []).append(path)
            done += len(chunk)
            if progress:
                progress(done, len(paths))
    return report


def findings(reports: dict[str, TreeReport]) -> tuple[list[str], list[str]]:
    """(errors, warnings) as sentences: unreadable images, empty class folders and train/val class sets that differ
    are errors (training skips or trips on them); non-image files and non-RGB modes are warnings (training ignores
    the first and converts the second)."""
    errors, warnings = [], []

    def some(items: Sequence[str]) -> str:
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    for split, r in reports.items():
        if r.unreadable:
            errors.append(f"{split}: {len(r.unreadable)} unreadable image(s): "
                          + some([f"{p} ({why})" for p, why in r.unreadable]))
        if r.empty_classes:
            errors.append(f"{split}: {len(r.empty_classes)} empty class folder(s): {some(r.empty_classes)}")
        if r.not_images:
            warnings.append(f"{split}: {len(r.not_images)} file(s) that are not images (ignored): "
                            f"{some(r.not_images)}")
        for mode, paths in sorted(r.odd_modes.items()):
            warnings.append(f"{split}: {len(paths)} image(s) in mode {mode} (converted to RGB): {some(paths)}")
    if "train" in reports:
        train = set(reports["train"].classes)
        for split, r in reports.items():
            if split != "train" and set(r.classes) != train:
                missing, extra = sorted(train - set(r.classes)), sorted(set(r.classes) - train)
                errors.append(f"{split} and train have different classes: {split} lacks {some(missing) or 'none'}, "
                              f"has extra {some(extra) or 'none'}")
    return errors, warnings


def trees_to_check(target: Path) -> list[tuple[str, Path]]:
    """The (split name, tree) pairs a `data check` folder names: train/ and val/ (or test/), or one ImageFolder
    tree. (A recipe names its own: `sources.recipe_folders`.)"""
    splits = [(name, target / name) for name in ("train", "val", "test") if (target / name).is_dir()]
    if splits and splits[0][0] == "train":
        return splits
    return [("images", target)]
