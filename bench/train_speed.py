"""Training speed on this machine: the engine before and after issue 14's changes, against a bare PyTorch loop.

Every measurement runs in a fresh process, one at a time, and is appended to bench/results/train_speed.json as
soon as it finishes (one row per measurement, keyed by its id), so an interrupted run continues where it stopped;
`--force ID...` measures those again. The tables go to bench/results/train_speed.md.

    mkdir -p ~/.cache/kd2deploy/cifar10
    tar -xzf ../shared/data/cifar10/cifar10-jpeg.tar.gz -C ~/.cache/kd2deploy/cifar10
    python bench/train_speed.py --data ~/.cache/kd2deploy/cifar10

Measurements:
- `kd/*`: vanilla KD, ResNet-10-T teacher (4.9M) and quarter-width ResNet-10-T student (0.34M), 32x32, global batch
  128, 2 loader workers, one epoch over `--images` CIFAR-10 JPEGs; `vit/*`: the LIB-KD family's ViT-nano student
  (libkd_nano_patch4_32, DeiT hard distillation) with the same CNN teacher. Per job: the engine before the change
  (commit BEFORE, run from a git worktree), then the new engine FP32/NCHW/loader processes, + bf16, + channels-last,
  + resident data (the new default), + torch.compile; and a bare hand-written FP32 loop doing the same job.
- `rednet/*`: RedNet-26 (CIFAR) forward+backward steps, quarter width with 3x3 involutions (batch 128) and full
  width with 7x7 (batch 32): the unfold involution with glibc's default allocator in NCHW FP32 (before) against the
  shift-and-accumulate involution with the engine's allocator setting, channels-last, FP32 and bf16.
- `busy/*`: the KD job quiet and beside a second process multiplying 1024x1024 matrices on 2 threads, before and
  after.
- `gpu/*` (when CUDA is present): a ResNet-18-size CIFAR student (resnet18_cifar, 11M) for one full CIFAR-10 epoch,
  bf16 autocast, with loader processes and with resident data.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEFORE = "6cc0aba"  # main before issue 14
CIFAR_STATS = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
TEACHER = {"name": "resnet10t"}
STUDENT = {"name": "resnet10t", "kwargs": {"channels": [16, 32, 64, 128]}}
VIT = {"name": "libkd_nano_patch4_32"}


# ------------------------------------------------------------------------------------------------ measurements
def engine_recipe(job: str, data_root: Path, images: int, run_dir: Path, new: dict | None, workers: int = 2,
                  full: bool = False) -> dict:
    """The job's recipe; `new` holds issue 14's fields (None: a recipe the engine before it accepts)."""
    raw = {"name": f"speed_{job}",
           "data": {"dataset": "imagefolder", "root": str(data_root), "val_dir": "val", "img_size": 32,
                    "num_workers": workers, **CIFAR_STATS, "augment": {"scale": [0.5, 1.0], "color_jitter": None}},
           "teacher": TEACHER, "student": STUDENT if job != "vit" else VIT,
           "distill": {"method": "kd"} if job != "vit" else {"method": "deit", "distillation_type": "hard"},
           "optim": {"epochs": 1, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4},
           "output": {"dir": str(run_dir), "tensorboard": False}, "device": "cpu"}
    if not full:
        raw["data"]["train_subset"] = images
    if job == "gpu":
        raw.update(teacher=None, student={"name": "resnet18_cifar"}, distill={"method": None}, device="cuda")
        raw["optim"]["batch_size"] = 512
    if new is not None:
        raw["data"]["on_device"] = new.pop("on_device", "auto")
        raw["optim"].update(new)
    return raw


def run_engine(raw: dict, before_tree: Path | None, competitor: bool = False) -> dict:
    """`kd2deploy train` in a fresh process (from `before_tree` for the old engine); the epoch's metrics row."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if before_tree is not None:
            env["PYTHONPATH"] = str(before_tree)
        cmd = [sys.executable, "-m", "kd2deploy", "train", str(recipe), "--overwrite"]
        rival = start_competitor() if competitor else None
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                                  cwd=before_tree or ROOT)
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        rows = (Path(raw["output"]["dir"]) / "metrics.csv").read_text().splitlines()
        header, last = rows[0].split(","), rows[-1].split(",")
        row = {key: _number(value) for key, value in zip(header, last, strict=True)}
        row["log"] = [line for line in done.stderr.splitlines() + done.stdout.splitlines()
                      if line.strip().startswith(("precision", "memory", "data:", "threads", "allocator", "OpenMP",
                                                  "compile"))]
        return row


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def start_competitor() -> subprocess.Popen:
    """A second PyTorch process multiplying 1024x1024 matrices on 2 threads until killed."""
    code = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # let it reach its steady state
    return proc


BARE_LOOP = r'''
import sys, time, torch, timm, torch.nn.functional as F
from timm.data import create_transform
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
root, images, student_kwargs = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])
torch.manual_seed(0)
transform = create_transform(32, is_training=True, scale=(0.5, 1.0), color_jitter=None,
                             mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
train = ImageFolder(root + "/train", transform=transform)
train = Subset(train, torch.randperm(len(train))[:images].tolist())
loader = DataLoader(train, batch_size=128, shuffle=True, num_workers=2, drop_last=True)
teacher = timm.create_model("resnet10t", num_classes=10).eval()
student = timm.create_model("resnet10t", num_classes=10, **student_kwargs)
opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
count, start = 0, time.perf_counter()
for x, y in loader:
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    loss = 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1),
                                                            reduction="batchmean", log_target=True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    count += len(x)
print(count / (time.perf_counter() - start))
'''


def run_bare(data_root: Path, images: int) -> dict:
    done = subprocess.run([sys.executable, "-c", BARE_LOOP, str(data_root), str(images), repr(STUDENT["kwargs"])],
                          capture_output=True, text=True, check=True)
    return {"images_per_s": float(done.stdout.strip().splitlines()[-1])}


REDNET_STEPS = r'''
import json, sys, time, torch, timm
mode, width, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
import kd2deploy.models
from kd2deploy.models import involution
from kd2deploy.train import acceleration
if mode == "before":
    involution.involution = involution.unfold_involution  # the previous implementation, default allocator, NCHW
else:
    acceleration.keep_freed_memory()
kwargs = {"channels": [16, 32, 64, 128], "stem_width": 16, "involution_kernel": 3} if width == "quarter" else {}
model = timm.create_model("rednet26_cifar", num_classes=10, **kwargs)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
if mode != "before":
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
amp = mode.endswith("bf16")
times = []
for i in range(int(sys.argv[4])):
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
'''


def run_rednet(mode: str, width: str, batch: int, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", REDNET_STEPS, mode, width, str(batch), str(steps)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    times = json.loads(done.stdout.strip().splitlines()[-1])[1:]  # the first step warms up
    median = statistics.median(times)
    return {"step_s": median, "images_per_s": batch / median, "steps": len(times)}


# ------------------------------------------------------------------------------------------------ the plan
def plan(args: argparse.Namespace, data_root: Path, before_tree: Path, tmp: Path) -> list[tuple[str, callable]]:
    n = args.images

    def engine(job: str, new: dict | None, competitor: bool = False, full: bool = False):
        return lambda: run_engine(engine_recipe(job, data_root, n, tmp / "run", new, full=full),
                                  before_tree if new is None else None, competitor)

    fp32 = {"amp": False, "channels_last": False, "on_device": False}
    fp32_fast = {"amp": False}  # channels-last and resident data at their defaults: the bundled CPU recipes
    bf16 = {"amp": "auto", "channels_last": False, "on_device": False}
    bf16_cl = {"amp": "auto", "channels_last": "auto", "on_device": False}
    default = {"amp": "auto"}  # channels_last, on_device and threads at their defaults (auto)
    compiled = {"amp": "auto", "compile": True}
    steps = []
    for job in ("kd", "vit"):
        steps += [(f"{job}/before", engine(job, None)), (f"{job}/fp32", engine(job, dict(fp32))),
                  (f"{job}/bf16", engine(job, dict(bf16))), (f"{job}/bf16+channels-last", engine(job, dict(bf16_cl))),
                  (f"{job}/bf16+channels-last+resident", engine(job, dict(default))),
                  (f"{job}/fp32+channels-last+resident", engine(job, dict(fp32_fast))),
                  (f"{job}/compiled", engine(job, dict(compiled)))]
    steps.append(("kd/bare-loop", lambda: run_bare(data_root, n)))
    for width, batch in (("quarter", 128), ("full", 32)):
        for mode in ("before", "after", "after-bf16"):
            steps.append((f"rednet/{width}/{mode}", lambda m=mode, w=width, b=batch: run_rednet(m, w, b, 12)))
    for label, new in (("before", None), ("after", default)):
        steps += [(f"busy/{label}/quiet", engine("kd", dict(new) if new else None)),
                  (f"busy/{label}/busy", engine("kd", dict(new) if new else None, competitor=True))]
    if args.gpu:
        steps += [("gpu/loader", engine("gpu", {"amp": True, "amp_dtype": "bfloat16", "on_device": False},
                                        full=True)),
                  ("gpu/resident", engine("gpu", {"amp": True, "amp_dtype": "bfloat16", "on_device": True},
                                          full=True))]
    return steps


def small_val_root(cifar: Path, tmp: Path, per_class: int = 100) -> Path:
    """train/ linked whole, val/ the first `per_class` test images per class (validation is not what is timed)."""
    root = tmp / "cifar10"
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(cifar / "train")
    for class_dir in sorted((cifar / "test").iterdir()):
        (root / "val" / class_dir.name).mkdir()
        for image in sorted(class_dir.iterdir())[:per_class]:
            (root / "val" / class_dir.name / image.name).symlink_to(image)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache/kd2deploy/cifar10")
    parser.add_argument("--images", type=int, default=10000, help="training images per timed epoch")
    parser.add_argument("--force", nargs="*", default=[], help="measure these ids again")
    parser.add_argument("--only", nargs="*", default=None, help="measure only ids starting with these")
    parser.add_argument("--gpu", action="store_true", help="also the gpu/* rows (needs CUDA)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from kd2deploy.bench.harness import training_machine
    from kd2deploy.checkpoint import atomic_write_text
    from kd2deploy.machine import busy_cores_elsewhere, cpu_flags

    results_file = RESULTS / "train_speed.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        before_tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), BEFORE], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            data_root = small_val_root(args.data.expanduser(), tmp)
            for ident, measure in plan(args, data_root, before_tree, tmp):
                if ident in results["rows"] and ident not in args.force:
                    continue
                if args.only is not None and not ident.startswith(tuple(args.only)):
                    continue
                busy = busy_cores_elsewhere(1.0)
                print(f"{ident} (busy elsewhere before: {busy:.2f} cores) ...", flush=True)
                row = measure()
                row.update({"busy_cores_before": round(busy, 2),
                            "measured": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
                results["rows"][ident] = row
                command = "python " + " ".join(sys.argv)
                commands = results.get("context", {}).get("commands", [])
                results["context"] = {**training_machine(), "cpu_flags": cpu_flags(), "images": args.images,
                                      "before": BEFORE, "commands": [*commands, command] if command not in commands
                                      else commands}
                row["command"] = command
                atomic_write_text(results_file, json.dumps(results, indent=1))
                print(f"  {row.get('images_per_s', 0):.0f} img/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, check=False,
                           capture_output=True)
    atomic_write_text(RESULTS / "train_speed.md", render(results))
    print(render(results))


# ------------------------------------------------------------------------------------------------ the report
def render(results: dict) -> str:
    rows, ctx = results["rows"], results.get("context", {})

    def ips(ident: str) -> str:
        return f"{rows[ident]['images_per_s']:.0f}" if ident in rows else "-"

    def ratio(a: str, b: str) -> str:
        return f"{rows[a]['images_per_s'] / rows[b]['images_per_s']:.2f}x" if a in rows and b in rows else "-"

    lines = ["# Training speed", "",
             "Commands (the first measured every row; later ones measured or re-measured the rows they name): "
             + ", ".join(f"`{c}`" for c in ctx.get("commands", [])) + "  ",
             f"Machine: {ctx.get('cpu')}, {ctx.get('cores')} cores ({', '.join(ctx.get('cpu_flags', []))}), GPU: "
             f"{ctx.get('gpu') or 'none'}; torch {ctx.get('versions', {}).get('torch')}. Each row is one fresh "
             "process, measured one at a time with nothing else running (the busy cores read just before each "
             "row are in train_speed.json). One run: ratios within it are comparable, absolute numbers move "
             "with the VM's neighbours. \"before\" is the engine at commit "
             f"{ctx.get('before', BEFORE)}. Epochs of {ctx.get('images', '?')} CIFAR-10 JPEG training images, "
             "global batch 128, 2 loader workers where loaders are used; images/s is the training loop alone.", ""]
    for job, title in (("kd", "KD: ResNet-10-T teacher → quarter-width ResNet-10-T student"),
                       ("vit", "DeiT (hard): ResNet-10-T teacher → ViT-nano student (libkd_nano_patch4_32)")):
        lines += [f"## {title}", "", "| engine | images/s | vs before | data s | teacher s | student s | "
                  "optimizer s | threads |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for variant in ("before", "fp32", "bf16", "bf16+channels-last", "bf16+channels-last+resident",
                        "fp32+channels-last+resident", "compiled"):
            ident = f"{job}/{variant}"
            if ident not in rows:
                continue
            r = rows[ident]
            phases = " | ".join(f"{r[f'time_{p}_s']:.1f}" if f"time_{p}_s" in r else "-"
                                for p in ("data", "teacher", "student", "optimizer"))
            label = variant
            if variant == "compiled" and "compile_s" in r:
                label = (f"compiled (+ {r['compile_s']:.0f} s compile in the first step; steady state "
                         f"{r['steady_images_per_s']:.0f} img/s)")
            lines.append(f"| {label} | {ips(ident)} | {ratio(ident, f'{job}/before')} | {phases} | "
                         f"{int(r['threads']) if 'threads' in r else '-'} |")
        if job == "kd" and "kd/bare-loop" in rows:
            lines.append(f"| bare FP32 loop (hand-written, same job) | {ips('kd/bare-loop')} | "
                         f"{ratio('kd/bare-loop', 'kd/before')} | - | - | - | - | 2 |")
        lines.append("")
    best, fp32_default = "kd/bf16+channels-last+resident", "kd/fp32+channels-last+resident"
    lines += ["Goals (KD at least 1.6x the engine before and 1.4x the bare FP32 loop): the fastest setting "
              f"(`optim.amp: auto`, bf16) at {ratio(best, 'kd/before')} and {ratio(best, 'kd/bare-loop')}; the "
              f"bundled CPU recipes' FP32 setting (channels-last, resident data) at {ratio(fp32_default, 'kd/before')}"
              f" and {ratio(fp32_default, 'kd/bare-loop')}. The compile row's compile time was measured with "
              "Inductor's on-disk cache warm from earlier runs (cold, compiling the step took 38-62 s here).", ""]
    lines += ["## RedNet-26 (CIFAR), forward + backward", "", "| model | batch | before img/s | after FP32 img/s | "
              "after bf16 img/s | after / before |", "|---|---:|---:|---:|---:|---:|"]
    for width, batch, name in (("quarter", 128, "quarter width, 3x3 involutions (0.44M)"),
                               ("full", 32, "full width, 7x7 involutions (7.2M)")):
        b, a, a16 = (f"rednet/{width}/{m}" for m in ("before", "after", "after-bf16"))
        best_after = max((x for x in (a, a16) if x in rows), key=lambda x: rows[x]["images_per_s"], default=None)
        lines.append(f"| {name} | {batch} | {ips(b)} | {ips(a)} | {ips(a16)} | "
                     f"{ratio(best_after, b) if best_after else '-'} |")
    lines += ["", "Before: the unfold involution, glibc's default allocator, NCHW. After: the shift-and-accumulate "
              "involution, the engine's allocator setting, channels-last. Median step of 11 after one warm-up.", ""]
    lines += ["## A busy machine", "", "The KD job alone, and beside a second process multiplying 1024x1024 "
              "matrices on 2 threads.", "", "| engine | quiet img/s | busy img/s | slowdown | threads chosen |",
              "|---|---:|---:|---:|---|"]
    for label in ("before", "after"):
        q, b = f"busy/{label}/quiet", f"busy/{label}/busy"
        if q in rows and b in rows:
            chosen = ("; ".join(line.strip() for line in rows[b].get("log", [])
                                if line.strip().startswith(("threads", "OpenMP")))
                      if label == "after" else "2 (torch's default), OpenMP's default wait policy")
            lines.append(f"| {label} | {ips(q)} | {ips(b)} | {ratio(q, b)} | {chosen} |")
    if any(k.startswith("gpu/") for k in rows):
        lines += ["", f"## GPU: {ctx.get('gpu')}", "", "| data | epoch s | images/s |", "|---|---:|---:|"]
        for k in ("gpu/loader", "gpu/resident"):
            if k in rows:
                lines.append(f"| {k.split('/')[1]} | {rows[k]['epoch_s']:.1f} | {ips(k)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
