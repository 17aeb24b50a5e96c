"""Training's ImageFolder: torchvision's, tolerant of files that cannot be read (see `checks` for the rules)."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset
from torchvision import datasets

from ..errors import UserError
from .checks import DECODE_ERRORS, header_problem


class TolerantImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder without the files whose header cannot be read (found in parallel threads when it
    is made), showing the next image in place of one that fails to decode later (a truncated JPEG). `skipped`
    lists what was left out; a later failure is appended to `skip_log` (set by the engine to the run folder's
    list; loader processes write it directly) and warned about once per process."""

    skip_log: Path | None = None

    def __init__(self, root: str, max_bad_fraction: float, field: str):
        super().__init__(root)
        self.warned = False
        with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
            problems = list(pool.map(header_problem, (path for path, _ in self.samples), chunksize=256))
        self.skipped = [(path, why) for (path, _), why in zip(self.samples, problems, strict=True) if why]
        if len(self.skipped) > max_bad_fraction * len(self.samples):
            names = ", ".join(Path(p).name for p, _ in self.skipped[:3])
            raise UserError(f"{len(self.skipped)} of {len(self.samples)} images in {root} ({field}) cannot be read "
                            f"(e.g. {names}): more than data.max_bad_fraction ({max_bad_fraction:g}). Run "
                            f"`kd2deploy data check {root}` for the full list; fix or remove them, or raise "
                            "data.max_bad_fraction to train without them.")
        if self.skipped:
            dropped = {path for path, _ in self.skipped}
            self.samples = self.imgs = [s for s in self.samples if s[0] not in dropped]
            self.targets = [target for _, target in self.samples]

    def __getitem__(self, index: int) -> Any:
        for attempt in range(min(len(self.samples), 16)):
            i = (index + attempt) % len(self.samples)
            try:
                return super().__getitem__(i)
            except DECODE_ERRORS as exc:
                self._record(self.samples[i][0], f"{type(exc).__name__}: {exc}")
        raise UserError(f"16 images in a row from {self.samples[index][0]} on cannot be decoded. Run "
                        f"`kd2deploy data check {self.root}` to list them.")

    def _record(self, path: str, why: str) -> None:
        if self.skip_log is not None:
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)  # decoding may start before the run folder exists
            with open(self.skip_log, "a") as f:
                f.write(f"{path}\t{why}\n")
        if not self.warned:
            self.warned = True
            print(f"warning: {path} cannot be decoded ({why}); the next image is used in its place"
                  + (f", and such files are listed in {self.skip_log}" if self.skip_log else ""), file=sys.stderr)


def image_folder(path: Path, field: str, max_bad_fraction: float) -> TolerantImageFolder:
    if not path.is_dir():
        raise UserError(f"Data folder {path} does not exist ({field}). Point `data.root` at a folder holding "
                        "one sub-folder per class (ImageFolder layout), e.g. train/<class>/*.jpg and "
                        "val/<class>/*.jpg.")
    try:
        return TolerantImageFolder(str(path), max_bad_fraction, field)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"Data folder {path} ({field}) holds no images in ImageFolder layout ({exc}). "
                        "It needs one sub-folder per class with .jpg/.png files inside.") from None


def skipped_images(*folders: Dataset) -> list[tuple[str, str]]:
    """What the TolerantImageFolders under `folders` (Subsets unwrapped) left out when they were made."""
    out = []
    for folder in folders:
        while isinstance(folder, Subset):
            folder = folder.dataset
        out += getattr(folder, "skipped", [])
    return out


def set_skip_log(path: Path, *folders: Dataset) -> None:
    for folder in folders:
        while isinstance(folder, Subset):
            folder = folder.dataset
        if isinstance(folder, TolerantImageFolder):
            folder.skip_log = path
