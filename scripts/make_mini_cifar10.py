"""Build the bundled mini CIFAR-10: a stratified, seeded subset of the full JPEG copy.

Usage: python scripts/make_mini_cifar10.py SRC_DIR [--train-per-class 600] [--val-per-class 100]
SRC_DIR holds train/<class>/*.jpg and test/<class>/*.jpg (../shared/data/cifar10, extracted).
The JPEG bytes are copied unchanged, so the subset holds the same real images as the source.
"""
import argparse
import random
import shutil
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / "kd2deploy" / "assets" / "mini_cifar10"


def copy_split(src: Path, dst: Path, per_class: int, rng: random.Random) -> int:
    count = 0
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))
        for f in sorted(rng.sample(files, per_class)):
            out = dst / class_dir.name / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if DEST.exists():
        shutil.rmtree(DEST)
    rng = random.Random(args.seed)
    n_train = copy_split(args.src / "train", DEST / "train", args.train_per_class, rng)
    n_val = copy_split(args.src / "test", DEST / "val", args.val_per_class, rng)
    print(f"wrote {n_train} train and {n_val} val images to {DEST}")


if __name__ == "__main__":
    main()
