"""The published `kd2deploy bench` table for this machine, and the benchmark_app cross-check.

1. One `kd2deploy bench` command over MobileNetV2, ResNet-18 and DeiT-Tiny at 224x224 and the CAP-KD-distilled
   CIFAR-10 ResNet-10 student (32x32): every backend and precision their export folders hold (PyTorch eager and
   compiled, ONNX Runtime FP32/INT8, OpenVINO FP32/INT8), batch 1 and 32, each artifact in its own process. Its
   bench.md/csv/json/png go to bench/results/bench_cpu/.
2. OpenVINO's own `benchmark_app` on the same IR files, threads and batch sizes (sync API, one stream: what the latency hint picks; benchmark_app takes -nthreads only with -hint none;
   f32 inference precision: the settings kd2deploy's OpenVINO runner uses). Goal: kd2deploy's p50 within 10% of
   benchmark_app's median.

The export folders come from bench/deploy_cpu.py (run it first; the 224 models carry one-epoch weights since no
pretrained weights can be downloaded here, so their top-1 is not meaningful).

    python bench/deploy_cpu.py          # once: runs and export folders under runs/bench_deploy
    python bench/bench_matrix.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from kd2deploy.checkpoint import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
EXPORTS = Path("runs/bench_deploy/exports")
MODELS = ["mobilenetv2_100", "resnet18", "deit_tiny_patch16_224", "capkd"]
AGREEMENT = 0.10


def benchmark_app(xml: Path, shape: list[int], threads: int, seconds: int) -> float:
    """benchmark_app's median latency (ms) for one IR at one static shape."""
    command = ["benchmark_app", "-m", str(xml), "-d", "CPU", "-api", "sync", "-hint", "none", "-nstreams", "1",
               "-nthreads", str(threads), "-infer_precision", "f32", "-shape", "[" + ",".join(map(str, shape)) + "]",
               "-t", str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"Median:\s+([\d.]+)\s*(ms|us)", done.stdout)  # it switches to us below 1 ms
    if match is None:
        raise RuntimeError(f"no median latency in benchmark_app's output:\n{done.stdout[-2000:]}")
    return float(match.group(1)) / (1e3 if match.group(2) == "us" else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", type=Path, default=EXPORTS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_cpu")
    parser.add_argument("--skip-matrix", action="store_true", help="reuse the out folder's bench.json")
    args = parser.parse_args()
    folders = [args.exports / name for name in MODELS]
    bench_command = ["kd2deploy", "bench", *map(str, folders), "--batch", "1,32", "--iters", "20", "--duration",
                     str(args.duration), "--warmup", "10", "--threads", str(args.threads), "--val-samples",
                     str(args.val_samples), "--out", str(args.out)]
    if not args.skip_matrix:
        subprocess.run([shutil.which("kd2deploy") or "kd2deploy", *bench_command[1:]], check=True)
    report = json.loads((args.out / "bench.json").read_text())

    rows = []
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        for record in (r for r in manifest["artifacts"] if r["backend"] == "openvino"):
            for batch in (1, 32):
                ours = next(r for r in report["rows"] if r["model"] == manifest["model"]["name"]
                            and r["artifact"] == record["name"] and r["batch"] == batch)
                theirs = benchmark_app(folder / record["file"], [batch, *manifest["input"]["shape"]], args.threads,
                                       int(args.duration))
                rows.append({"model": manifest["model"]["name"], "artifact": record["name"], "batch": batch,
                             "kd2deploy_p50_ms": ours["p50_ms"], "benchmark_app_median_ms": theirs,
                             "ratio": ours["p50_ms"] / theirs})
                print(rows[-1], flush=True)

    within = sum(abs(r["ratio"] - 1) <= AGREEMENT for r in rows)
    lines = ["# kd2deploy bench on this CPU, with the benchmark_app cross-check", "",
             f"Command: `python {' '.join(sys.argv)}`, which ran `{' '.join(bench_command)}` and then benchmark_app "
             "on each OpenVINO IR.", "",
             "The full table (latency percentiles, images/s, peak RSS, size, params, GFLOPs, top-1) is "
             f"[bench_cpu/bench.md](bench_cpu/bench.md), with [bench.csv](bench_cpu/bench.csv), "
             "[bench.json](bench_cpu/bench.json) and the plot [bench.png](bench_cpu/bench.png).", "",
             "## benchmark_app agreement (goal: within 10%)", "",
             f"benchmark_app settings: `-d CPU -api sync -hint none -nstreams 1 -nthreads {args.threads} "
             f"-infer_precision f32 -shape [B,C,H,W] -t {int(args.duration)}`, its median latency; kd2deploy: the p50 "
             "of the same IR, threads and batch from the table above.", "",
             "| model | artifact | batch | kd2deploy p50 ms | benchmark_app median ms | ratio | within 10% |",
             "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['artifact']} | {r['batch']} | {r['kd2deploy_p50_ms']:.3f} | "
              f"{r['benchmark_app_median_ms']:.3f} | {r['ratio']:.3f} | "
              f"{'yes' if abs(r['ratio'] - 1) <= AGREEMENT else 'no'} |" for r in rows]
    lines += ["", f"{within} of {len(rows)} rows within 10%.", ""]
    atomic_write_text(RESULTS / "bench_cpu.md", "\n".join(lines))
    atomic_write_text(RESULTS / "bench_cpu_benchmark_app.json",
                      json.dumps({"command": "python " + " ".join(sys.argv), "bench_command": bench_command,
                                  "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
