"""`kd2deploy robustness make-sets`: write every manipulated set of a val ImageFolder as ImageFolder trees of PNGs
(lossless, so the manipulation is all that changed), an `original/` copy of the same images, and `sets.json`
(how each set was made, its parameters, the seed, and a sha256 of every tree). Deterministic given the seed;
parallel over processes; torch-free."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..checkpoint import atomic_write_text
from ..data.valset import IMG_EXTENSIONS, spread_indices
from ..errors import UserError
from . import sets as gen

FORMAT = 1
SETS_FILE = "sets.json"
ORIGINAL = "original"
CONFLICTS = "conflicts.csv"


def list_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, class index) of an ImageFolder tree, in torchvision's order."""
    if not root.is_dir():
        raise UserError(f"--val {root} is not a folder. Give a val set with one sub-folder per class "
                        "(ImageFolder layout), e.g. data/cifar10-jpeg/test.")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    items = [(Path(folder) / file, label) for label, name in enumerate(classes)
             for folder, _, files in sorted(os.walk(root / name, followlinks=True))
             for file in sorted(files) if file.lower().endswith(IMG_EXTENSIONS)]
    if len(classes) < 2 or not items:
        raise UserError(f"--val {root} holds {len(items)} images in {len(classes)} class folders; the sets need an "
                        "ImageFolder tree with at least two classes.")
    return classes, items


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _load(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise UserError(f"Val image {path} cannot be read ({exc}). Remove or replace it "
                        "(`kd2deploy data check` lists every unreadable file).") from None


def _apply(spec: gen.SetSpec, image: np.ndarray, rng: np.random.Generator, partner: np.ndarray | None,
           seed: int) -> np.ndarray:
    p = spec.params
    if spec.kind == "corruption":
        return gen.corrupt(image, rng, p["corruption"], p["severity"])
    if spec.name == "locality":
        return gen.locality(image, p["n_segments"], p["compactness"])
    if spec.name.startswith("scramble_"):
        return gen.scramble(image, rng, p["grid"])
    if spec.name == "noise":
        return gen.FixedNoise(seed, p["fraction"], p["sigma"])(image)
    if spec.name == "shape":
        return gen.edges(image, p["sigma"])
    if spec.name == "texture":
        return gen.amplitude_phase(image, partner)
    raise ValueError(spec.name)


def _work(chunk: list[int], items: list[tuple[Path, int]], names: list[str], specs: list[gen.SetSpec],
          partners: dict[int, int], corrupted: set[int], out: Path, seed: int) -> int:
    """Every set's version of the images at `chunk`; returns how many images were done."""
    for i in chunk:
        path, label = items[i]
        image = _load(path)
        stem = f"{path.stem}.png"
        Image.fromarray(image).save(out / ORIGINAL / names[label] / stem)
        for spec in specs:
            if (spec.kind == "corruption" and i not in corrupted) or spec.construction == "pretrained":
                continue
            partner = _load(items[partners[i]][0]) if spec.name == "texture" else None
            result = _apply(spec, image, gen.image_rng(seed, spec.name, i), partner, seed)
            Image.fromarray(result).save(out / spec.name / names[label] / stem)
    return len(chunk)


def texture_partners(labels: np.ndarray, seed: int) -> dict[int, int]:
    """For each image, a seeded image of another class whose phase (shape) it gets."""
    partners = {}
    for i, label in enumerate(labels):
        others = np.flatnonzero(labels != label)
        partners[i] = int(others[gen.image_rng(seed, "texture-partner", i).integers(len(others))])
    return partners


def _pretrained_pass(specs: list[gen.SetSpec], items: list[tuple[Path, int]], names: list[str],
                     partners: dict[int, int], out: Path, progress: Progress, batch: int = 32) -> None:
    """The sets made by networks, batch by batch in this process (torch uses every core)."""
    from . import pretrained

    makers = {spec.name: (pretrained.Silhouettes(spec.params["size"]) if spec.name == "shape" else
                          pretrained.StyleTransfer(spec.params["size"], spec.params["steps"],
                                                   spec.params["style_weight"], spec.params["lr"]))
              for spec in specs}
    for name, make in makers.items():
        task = progress.add_task(f"{name} (pretrained)", total=len(items))
        for start in range(0, len(items), batch):
            chunk = range(start, min(start + batch, len(items)))
            images = np.stack([_load(items[i][0]) for i in chunk])
            if name == "texture":
                results = make(images, np.stack([_load(items[partners[i]][0]) for i in chunk]))
            else:
                results = make(images)
            for i, result in zip(chunk, results, strict=True):
                path, label = items[i]
                Image.fromarray(result).save(out / name / names[label] / f"{path.stem}.png")
            progress.advance(task, len(chunk))


def choose_construction(construction: str, console: Console) -> bool:
    """Whether shape and texture are made by the pretrained networks (`auto`: when their weights are here)."""
    from . import pretrained

    if construction == "offline":
        return False
    reasons = pretrained.missing()
    if construction == "pretrained" and reasons:
        raise UserError("--construction pretrained needs torchvision's FCN-ResNet-101 and VGG-19 weights in torch's "
                        f"hub cache, and here {'; '.join(reasons)}. Download them once on a connected machine "
                        "(e.g. `python -c \"import torchvision.models as m; m.vgg19(weights='IMAGENET1K_V1'); "
                        "m.segmentation.fcn_resnet101(weights='COCO_WITH_VOC_LABELS_V1')\"`) and copy the files "
                        "there, or use --construction offline.")
    if reasons:
        console.print(f"shape and texture: offline construction ({'; '.join(reasons)}; the pretrained one needs "
                      "both networks' weights).")
    return not reasons


def make_sets(val: Path, out: Path, names: list[str] | None = None, seed: int = 0, samples: int | None = None,
              corruption_samples: int | None = 2000, workers: int | None = None, noise_fraction: float = 1.0,
              noise_sigma: float = 0.1, segments: int = 64, console: Console | None = None,
              overwrite: bool = False, command: str = "", construction: str = "offline") -> dict[str, Any]:
    """`construction` (offline, pretrained or auto) says how the shape and texture sets are made."""
    console = console or Console(stderr=True)
    if construction not in ("offline", "pretrained", "auto"):
        raise UserError(f"--construction {construction!r} is not one of offline, pretrained, auto.")
    specs = _select(gen.bias_sets(noise_fraction, noise_sigma, segments) + gen.corruption_sets(), names)
    if any(s.name in ("shape", "texture") for s in specs) and choose_construction(construction, console):
        pretrained_specs = gen.bias_sets(noise_fraction, noise_sigma, segments, pretrained=True)
        specs = [next(p for p in pretrained_specs if p.name == s.name) if s.kind == "bias" else s for s in specs]
    if (out / SETS_FILE).exists() and not overwrite:
        raise UserError(f"{out} already holds sets ({SETS_FILE}). Give another --out, or --overwrite to replace "
                        "them.")
    classes, items = list_images(val)
    if samples is not None and samples < len(items):
        items = [items[i] for i in spread_indices(len(items), samples)]
    labels = np.asarray([label for _, label in items])
    corrupted = set(range(len(items)) if corruption_samples is None or corruption_samples >= len(items)
                    else spread_indices(len(items), corruption_samples).tolist())
    partners = texture_partners(labels, seed) if any(s.name == "texture" for s in specs) else {}
    partial_dir = out.with_name(out.name + ".partial")
    shutil.rmtree(partial_dir, ignore_errors=True)
    for folder in [ORIGINAL, *(s.name for s in specs)]:
        for name in classes:
            (partial_dir / folder / name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    chunks = [list(range(i, min(i + 256, len(items)))) for i in range(0, len(items), 256)]
    job = partial(_work, items=items, names=classes, specs=specs, partners=partners, corrupted=corrupted,
                  out=partial_dir, seed=seed)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        with ProcessPoolExecutor(workers) as pool:
            task = progress.add_task("making sets", total=len(items))
            for done in pool.map(job, chunks):
                progress.advance(task, done)
        networks = [s for s in specs if s.construction == "pretrained"]
        if networks:
            _pretrained_pass(networks, items, classes, partners, partial_dir, progress)
    if partners:
        rows = ["file,texture_class,shape_class"] + [
            f"{classes[labels[i]]}/{items[i][0].stem}.png,{classes[labels[i]]},{classes[labels[partners[i]]]}"
            for i in range(len(items))]
        (partial_dir / "texture" / CONFLICTS).write_text("\n".join(rows) + "\n")
    record = {
        "format": FORMAT, "kd2deploy": __version__, "seed": seed,
        "command": command,
        "source": {"dir": str(val), "images": len(items), "classes": classes,
                   "sha256": tree_digest(partial_dir / ORIGINAL)},
        "sets": {s.name: {**asdict(s), "images": len(items) if s.kind == "bias" else len(corrupted),
                          "sha256": tree_digest(partial_dir / s.name)} for s in specs},
        "seconds": round(time.perf_counter() - started, 1), "workers": workers,
    }
    atomic_write_text(partial_dir / SETS_FILE, json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial_dir.rename(out)
    return record


def _select(available: list[gen.SetSpec], names: list[str] | None) -> list[gen.SetSpec]:
    """The sets named (a set's name, `bias`, `corruptions`, or a corruption's name for all its severities)."""
    if not names:
        return available
    chosen, unknown = [], []
    for name in names:
        picked = [s for s in available if s.name == name or (name == "bias" and s.kind == "bias")
                  or (name == "corruptions" and s.kind == "corruption")
                  or (s.kind == "corruption" and s.params["corruption"] == name)]
        if not picked:
            unknown.append(name)
        chosen += [p for p in picked if p not in chosen]
    if unknown:
        known = sorted({s.name for s in available if s.kind == "bias"} | set(gen.CIFAR_C))
        raise UserError(f"--sets names unknown set(s): {', '.join(unknown)}. Choose from bias, corruptions, "
                        f"{', '.join(known)} (or a corruption with its severity, e.g. contrast_3).")
    return chosen
