"""The published `kd2deploy bench` table for this machine, and the benchmark_app cross-check.

1. Export folders (made once, reused): timm MobileNetV2, ResNet-18 and DeiT-Tiny at 224x224 (one short epoch on
   upscaled CIFAR-10 images, as in bench/deploy_cpu.py: no pretrained weights can be downloaded here, so their
   latency is real and their top-1 is not meaningful) and one distilled CIFAR-10 student (default: the KD student of
   `kd2deploy quickstart`). Each is exported to ONNX FP32/INT8 and OpenVINO FP32/FP16/INT8 for the laptop-x86 target.
2. One `kd2deploy bench` command over the four folders: every backend and precision they hold (PyTorch eager and
   compiled, ONNX Runtime, OpenVINO), batch 1 and 32, each artifact in its own process, top-1 on the CIFAR-10 test
   images. Its bench.md/csv/json/png go to bench/results/bench_cpu/.
3. OpenVINO's `benchmark_app` on every IR at the same threads and batch, compiled with the very properties
   kd2deploy's runner uses (OpenVinoBackend.compile_config, passed with -load_config) and the sync API. The two
   tools alternate, `--rounds` times per IR, so a slow spell of this shared machine hits both; the median of each
   tool's per-round medians is compared. Goal: within 10%. benchmark_app's odd rounds against its even rounds
   show how far this machine's noise alone moves a median.

    mkdir -p data && ln -s ~/.cache/kd2deploy/cifar10 data/cifar10-jpeg   # the extracted CIFAR-10 JPEG copy
    kd2deploy quickstart                                                  # the distilled student (8 to 10 min)
    python bench/bench_matrix.py
    python bench/bench_matrix.py --render-only   # rewrite bench_cpu.md from bench_cpu_benchmark_app.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from deploy_cpu import DATA, TIMM_MODELS, timm_run
from rich.console import Console

from kd2deploy.backends.ov import OpenVinoBackend
from kd2deploy.bench.run import run_isolated
from kd2deploy.checkpoint import atomic_write_text
from kd2deploy.deploy.pipeline import export_run

RESULTS = Path(__file__).resolve().parent / "results"
AGREEMENT = 0.10
BATCHES = (1, 32)
SHOWN_PROPERTIES = ("NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT",
                    "ENABLE_CPU_PINNING")



def prepare(out: Path, student: Path, console: Console) -> list[Path]:
    """The four export folders, exported once (delete a folder to export it again)."""
    runs = [timm_run(name, out / "runs", 50, console) for name, _, _ in TIMM_MODELS] + [student]
    folders = []
    for run_dir in runs:
        folder = out / "exports" / run_dir.name
        if not (folder / "manifest.json").is_file():
            console.rule(f"export {run_dir}")
            export_run(run_dir, out_dir=folder, formats=["onnx", "openvino"], precisions=["fp32", "fp16", "int8"],
                       profile="laptop-x86", calib_samples=256, val_samples=500, atol_fp16=0.1, speed=False,
                       console=console)  # one-epoch 224 models have large logits: FP16 weights move them ~0.06
        folders.append(folder)
    return folders


def benchmark_app(xml: Path, shape: list[int], config: Path, seconds: float) -> tuple[float, dict[str, str]]:
    """benchmark_app's median latency (ms) for one IR at one static shape, and the compiled model's properties it
    printed."""
    command = ["benchmark_app", "-m", str(xml), "-d", "CPU", "-api", "sync", "-load_config", str(config),
               "-shape", "[" + ",".join(map(str, shape)) + "]", "-t", str(max(1, round(seconds)))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    match = re.search(r"Median:\s+([\d.]+)\s*(ms|us)", done.stdout)  # it switches to us below 1 ms
    if match is None:
        raise RuntimeError(f"no median latency in benchmark_app's output:\n{done.stdout[-2000:]}")
    # step 8 lists every property of the compiled model, indented under "Model:"
    step8 = done.stdout[done.stdout.index("[Step 8/"):done.stdout.index("[Step 9/")]
    properties = dict(re.findall(r"^\[ INFO \]   (\w+): (.*?)\s*$", step8, re.M))
    return float(match.group(1)) / (1e3 if match.group(2) == "us" else 1.0), properties


def kd2deploy_properties(xml: Path, shape: list[int], threads: int, names: list[str]) -> dict[str, str]:
    """The same properties of the model kd2deploy's runner compiles."""
    runner = OpenVinoBackend.load(xml, threads)
    compiled = runner.request_for(tuple(shape)).get_compiled_model()
    return {name: str(compiled.get_property(name)) for name in names}


def cross_check(folders: list[Path], threads: int, seconds: float, rounds: int, scratch: Path) -> list[dict]:
    config = scratch / "openvino.json"  # exactly the properties kd2deploy's runner compiles with
    config.write_text(json.dumps({"CPU": OpenVinoBackend.compile_config("CPU", threads)}))
    rows = []
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        for record in (r for r in manifest["artifacts"] if r["backend"] == "openvino"):
            xml, shape = folder / record["file"], manifest["input"]["shape"]
            timings = {(batch, key): [] for batch in BATCHES for key in ("host", "runtime", "benchmark_app")}
            properties = {}
            for _ in range(rounds):
                job = {"name": record["name"], "backend": "openvino", "path": str(xml), "batches": list(BATCHES),
                       "input_shape": shape, "val": None, "iters": 20, "warmup": 10, "duration": seconds,
                       "threads": threads}
                for row in run_isolated(job, scratch)["rows"]:  # what `kd2deploy bench` runs for this IR
                    timings[row["batch"], "host"].append(row["p50_ms"])
                    timings[row["batch"], "runtime"].append(row["runtime_p50_ms"])
                for batch in BATCHES:
                    median, properties[batch] = benchmark_app(xml, [batch, *shape], config, seconds)
                    timings[batch, "benchmark_app"].append(median)
            for batch in BATCHES:
                mine = kd2deploy_properties(xml, [batch, *shape], threads, sorted(properties[batch]))
                theirs = float(np.median(timings[batch, "benchmark_app"]))
                rows.append({"model": manifest["model"]["name"], "artifact": record["name"], "batch": batch,
                             **{f"{key}_ms": [round(v, 4) for v in timings[batch, key]]
                                for key in ("host", "runtime", "benchmark_app")},
                             "host_ratio": float(np.median(timings[batch, "host"])) / theirs,
                             "runtime_ratio": float(np.median(timings[batch, "runtime"])) / theirs,
                             "compiled": mine, "differing_properties": sorted(k for k, v in mine.items()
                                                                              if properties[batch][k] != v)})
                print(rows[-1], flush=True)
    return rows


def self_ratio(values: list[float]) -> float:
    """A tool against itself: the median of its odd rounds over that of its even rounds. How far this ratio strays
    from 1 is the machine's own noise, the floor under any agreement between two tools."""
    return float(np.median(values[0::2]) / np.median(values[1::2]))


def markdown(report: dict) -> str:
    def within(ratio: float) -> bool:
        return abs(ratio - 1) <= AGREEMENT

    rows, settings = report["rows"], report["settings"]
    compiled = rows[0]["compiled"] if rows else {}
    lines = ["# kd2deploy bench on this CPU, with the benchmark_app cross-check", "",
             f"Command: `{report['command']}`, which ran `{' '.join(report['bench_command'])}` and then the "
             "cross-check below.", "",
             "The full table (latency percentiles, images/s, peak RSS, size, params, GFLOPs, top-1) is "
             "[bench_cpu/bench.md](bench_cpu/bench.md), with [bench.csv](bench_cpu/bench.csv), "
             "[bench.json](bench_cpu/bench.json) and the plot [bench.png](bench_cpu/bench.png); its header names "
             "the machine.", "",
             "## benchmark_app agreement (goal: within 10%)", "",
             "benchmark_app: `-d CPU -api sync -load_config openvino.json -shape [B,C,H,W] "
             f"-t {round(settings['check_duration'])}`, where openvino.json holds exactly what kd2deploy's OpenVINO "
             f"runner compiles with (`{json.dumps(OpenVinoBackend.compile_config('CPU', settings['threads']))}`); its "
             "median latency, which is OpenVINO's own per-request latency. kd2deploy: `kd2deploy bench`'s own timing "
             f"process for the same IR, threads and batch ({settings['check_duration']:g} s of timed runs after 10 "
             "warm-up runs), with two figures: *host p50*, the wall clock around each Python call (what the table's "
             "p50 column measures), and *runtime p50*, OpenVINO's own latency of the same calls (its runtime p50 "
             "column). Their gap is what calling the runtime from Python costs. The tools alternated "
             f"{settings['rounds']} times per IR (cells: each round); ratios are of the medians over rounds. "
             "*benchmark_app vs itself* is its odd rounds' median over its even rounds': the noise of this machine "
             "between one run and the next, the floor under any agreement. The compiled models agreed on all "
             f"{len(compiled)} properties benchmark_app prints (its step 8) wherever the last column says none; "
             "among them " + ", ".join(f"{k} {compiled[k]}" for k in SHOWN_PROPERTIES if k in compiled) + ".", "",
             "| model | artifact | batch | kd2deploy host p50 ms | kd2deploy runtime p50 ms | benchmark_app median ms "
             "| host / benchmark_app | runtime / benchmark_app | benchmark_app vs itself | properties that differ |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def cells(values: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in values)

    def ratio(value: float) -> str:
        return f"{value:.3f} {'✓' if within(value) else '✗'}"

    lines += [f"| {r['model']} | {r['artifact']} | {r['batch']} | {cells(r['host_ms'])} | {cells(r['runtime_ms'])} | "
              f"{cells(r['benchmark_app_ms'])} | {ratio(r['host_ratio'])} | {ratio(r['runtime_ratio'])} | "
              f"{ratio(self_ratio(r['benchmark_app_ms']))} | {', '.join(r['differing_properties']) or 'none'} |"
              for r in rows]
    host, runtime = (sum(within(r[key]) for r in rows) for key in ("host_ratio", "runtime_ratio"))
    itself = sum(within(self_ratio(r["benchmark_app_ms"])) for r in rows)
    lines += ["", f"Within 10% (✓): kd2deploy's host p50 in {host} of {len(rows)} rows, its runtime p50 in {runtime}; "
              f"benchmark_app against its own other rounds in {itself}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_matrix"))
    parser.add_argument("--student", type=Path, default=Path("runs/quickstart/kd"),
                        help="a distilled CIFAR-10 student's run folder (`kd2deploy quickstart` writes this one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8, help="benchmark_app/kd2deploy alternations per IR")
    parser.add_argument("--check-duration", type=float, default=2.0, help="seconds per tool and round")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--skip-matrix", action="store_true", help="reuse bench_cpu/bench.json")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite bench_cpu.md from bench_cpu_benchmark_app.json")
    args = parser.parse_args()
    report_file = args.results / "bench_cpu_benchmark_app.json"
    if not args.render_only:
        folders = prepare(args.out, args.student, Console())
        bench_command = ["kd2deploy", "bench", *map(str, folders), "--batch", ",".join(map(str, BATCHES)),
                         "--iters", "20", "--duration", f"{args.duration:g}", "--warmup", "10", "--threads",
                         str(args.threads), "--val", f"{DATA}/test", "--val-samples", str(args.val_samples), "--out",
                         str(args.results / "bench_cpu")]
        if not args.skip_matrix:
            subprocess.run([sys.executable, "-m", "kd2deploy", *bench_command[1:]], check=True)
        with tempfile.TemporaryDirectory(prefix="bench-matrix-") as scratch:
            rows = cross_check(folders, args.threads, args.check_duration, args.rounds, Path(scratch))
        settings = {"threads": args.threads, "check_duration": args.check_duration, "rounds": args.rounds}
        atomic_write_text(report_file, json.dumps({"command": "python " + " ".join(sys.argv),
                                                   "bench_command": bench_command, "settings": settings,
                                                   "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.results / "bench_cpu.md", markdown(json.loads(report_file.read_text())))
    print((args.results / "bench_cpu.md").read_text())


if __name__ == "__main__":
    main()
