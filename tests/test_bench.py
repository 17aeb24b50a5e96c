"""Bench: latency statistics, warm-up exclusion, the matrix of folders x backends x precisions x batch sizes (each
artifact in its own process), every backend runner, bench.md/csv/json and the plot, the recommendation, --compare,
and manifest checks."""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HAS_OPENVINO, quiet, requires_openvino, run_cli, train_run
from typer.testing import CliRunner

from kd2deploy.backends import get_backend
from kd2deploy.bench.harness import harness_overhead_us, latency_stats, measure, time_runner
from kd2deploy.bench.report import compare_reports, pareto_front, recommendation
from kd2deploy.bench.run import run_bench
from kd2deploy.checkpoint import sha256
from kd2deploy.cli import app
from kd2deploy.data.sources import MINI_CIFAR10
from kd2deploy.deploy.manifest import MANIFEST
from kd2deploy.deploy.pipeline import export_run
from kd2deploy.errors import CheckFailed, UserError

BATCHES = [1, 3]
BENCH = {"batches": BATCHES, "iters": 5, "warmup": 1, "threads": 1, "val_samples": 50,
         "backends": ["pytorch", "onnxruntime"]}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    run_dir = train_run(tmp_path_factory.mktemp("bench"), data={"train_subset": 64})
    formats = ["onnx", "openvino"] if HAS_OPENVINO else ["onnx"]  # the OpenVINO tests skip without it
    manifest = export_run(run_dir, formats=formats, precisions=["fp32", "int8"], calib_samples=32,
                          val_samples=32, speed=False, console=quiet())
    return Path(manifest["artifact_dir"])


def copy_export(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "export"))


def test_latency_stats_on_known_times():
    stats = latency_stats([0.001 * i for i in range(1, 11)], batch=4)  # 1..10 ms
    assert stats["p50_ms"] == pytest.approx(5.5)
    assert stats["p90_ms"] == pytest.approx(9.1)  # numpy's linear interpolation
    assert stats["p99_ms"] == pytest.approx(9.91)
    assert stats["mean_ms"] == pytest.approx(5.5)
    assert stats["images_per_s"] == pytest.approx(4 / 0.0055) and stats["runs"] == 10


class SlowStart:
    """A runner whose first `slow` calls take 30 ms (a cold cache, a JIT): warm-up must absorb them."""

    def __init__(self, slow: int):
        self.calls, self.slow = 0, slow

    def run(self, batch):
        self.calls += 1
        if self.calls <= self.slow:
            time.sleep(0.03)
        return batch


def test_warmup_runs_are_excluded_from_the_timings():
    runner = SlowStart(slow=3)
    times = time_runner(runner, np.zeros(1), iters=5, warmup=3)
    assert runner.calls == 8 and len(times) == 5 and max(times) < 0.01
    cold = time_runner(SlowStart(slow=3), np.zeros(1), iters=5, warmup=0)
    assert sum(t > 0.025 for t in cold) == 3


def test_duration_runs_at_least_that_long_and_at_least_iters():
    times = time_runner(SlowStart(slow=0), np.zeros(1), iters=3, warmup=0, duration=0.05)
    assert len(times) > 3
    assert len(time_runner(SlowStart(slow=10), np.zeros(1), iters=4, warmup=0, duration=0.001)) == 4


def test_harness_overhead_is_measured_and_small():
    assert 0 < harness_overhead_us() < 100


def test_pareto_front_and_recommendation_on_known_points():
    points = [(1.0, 70.0), (2.0, 80.0), (3.0, 75.0), (0.5, 60.0), (2.0, 79.0)]
    assert pareto_front(points) == [3, 0, 1]  # (3, 75) and (2, 79) are beaten by (2, 80)
    rows = [{"artifact": name, "batch": batch, "p50_ms": ms, "top1": top1}
            for name, batch, ms, top1 in [("fp32", 1, 2.0, 80.0), ("int8", 1, 1.0, 79.5), ("tiny", 1, 0.5, 70.0),
                                          ("int8", 8, 0.1, 79.5)]]
    rec = recommendation(rows, max_drop=1.0)
    assert rec["artifact"] == "int8" and rec["batch"] == 1 and rec["drop"] == pytest.approx(0.5)
    assert recommendation(rows, max_drop=0.1)["artifact"] == "fp32"


def test_bench_rows_and_reports(export_dir):
    rows = run_bench(export_dir, console=quiet(), **BENCH)
    assert [(r["artifact"], r["batch"]) for r in rows] == [
        (name, batch) for name in ("pytorch-fp32", "onnx-fp32", "onnx-int8") for batch in BATCHES]
    manifest = json.loads((export_dir / MANIFEST).read_text())
    for row in rows:
        assert row["model"] == "test_resnet" and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["images_per_s"] > 0 and row["size_mb"] > 0 and 0 <= row["top1"] <= 100
        assert 20 < row["peak_rss_mb"] < 4000 and row["gpu_mem_mb"] is None  # the artifact's own process
        assert row["params_m"] == pytest.approx(manifest["model"]["params"] / 1e6)
        assert row["gflops"] == pytest.approx(manifest["model"]["gflops"]) and row["gflops"] > 0
    by_artifact = {r["artifact"]: r["top1"] for r in rows}
    assert by_artifact["onnx-fp32"] == pytest.approx(by_artifact["pytorch-fp32"], abs=2.0)  # 50 images: 1 may flip

    report = json.loads((export_dir / "bench.json").read_text())
    assert report["rows"] == rows and report["failures"] == []
    context = report["context"]
    assert context["threads"] == 1 and context["val_images"] == 50 and context["cores"] >= 1
    assert "onnxruntime" in context["versions"] and "gpu" in context and context["cpu_flags"] is not None
    assert context["harness_overhead_us"] > 0 and report["recommendation"]["batch"] == 1
    assert context["isolation"] == "each artifact in a fresh process" and context["timing"]
    markdown = (export_dir / "bench.md").read_text()
    assert ("| model | artifact | backend | batch | top-1 % | p50 ms | p90 ms | p99 ms | mean ms | images/s | "
            "peak RSS MB | size MB | params M | GFLOPs |") in markdown  # no GPU MB column on a CPU
    assert markdown.count("| onnx-int8 |") == len(BATCHES)
    assert "Command: `" in markdown and context["cpu"] in markdown
    assert f"Recommended: {report['recommendation']['artifact']}" in markdown
    with open(export_dir / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["artifact"], int(r["batch"])) for r in table] == [(r["artifact"], r["batch"]) for r in rows]
    assert float(table[0]["p99_ms"]) == pytest.approx(rows[0]["p99_ms"]) and table[0]["precision"] == "fp32"
    assert (export_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@requires_openvino
def test_bench_matrix_cli(export_dir, tmp_path):
    """Two folders (an export folder and a run folder) into one table, filtered by backend and precision, top-1
    on a given val folder."""
    out = tmp_path / "report"
    result = run_cli("bench", export_dir, export_dir.parent, "--backends", "pytorch,openvino", "--precisions",
                     "int8,fp32", "--batch", "2", "--iters", "3", "--warmup", "1", "--threads", "1",
                     "--val", MINI_CIFAR10 / "val", "--val-samples", "30", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    assert [(r["artifact"], r["backend"], r["batch"]) for r in report["rows"]] == [
        ("pytorch-fp32", "pytorch", 2), ("openvino-fp32", "openvino", 2), ("openvino-int8", "openvino", 2),
        ("pytorch-fp32", "pytorch", 2)]  # the run folder gives PyTorch rows only
    top1 = [r["top1"] for r in report["rows"]]
    assert top1[0] == top1[3] and top1[1] == pytest.approx(top1[0], abs=100 / 30 + 1e-9)
    assert report["context"]["val_images"] == 30 and "--val" in report["context"]["command"]
    assert {"bench.md", "bench.csv", "bench.json", "bench.png"} <= {p.name for p in out.iterdir()}
    assert "openvino-int8" in result.stdout and "Recommended:" in result.stdout

    result = run_cli("bench", export_dir, "--backends", "tflite")
    assert result.returncode == 2 and "--backends" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("bench", export_dir, "--backends", "onnxruntime", "--precisions", "fp16")
    assert result.returncode == 2 and "Nothing to benchmark" in result.stderr


@pytest.mark.parametrize("backend", ["pytorch", "pytorch-compiled", "onnxruntime", "openvino", "tensorrt"])
def test_each_backend_runner_on_a_tiny_model(export_dir, tmp_path, backend):
    reason = get_backend(backend).unavailable()
    if reason:
        pytest.skip(reason)
    manifest = json.loads((export_dir / MANIFEST).read_text())
    path = {"pytorch": manifest["source_checkpoint"]["path"], "pytorch-compiled": manifest["source_checkpoint"]["path"],
            "onnxruntime": export_dir / "onnx-fp32" / "model.onnx",
            "openvino": export_dir / "openvino-fp32" / "model.xml",
            "tensorrt": export_dir / "tensorrt-fp32" / "model.engine"}[backend]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((5, *manifest["input"]["shape"]), dtype=np.float32)
    reference = get_backend("onnxruntime").load(export_dir / "onnx-fp32" / "model.onnx").run(images)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", reference.argmax(axis=1))  # labels the reference gets all right
    result = measure({"name": backend, "backend": backend, "path": str(path), "batches": [1, 2], "threads": 1,
                      "input_shape": manifest["input"]["shape"], "iters": 3, "warmup": 1, "duration": None,
                      "val": {"images": str(tmp_path / "images.npy"), "labels": str(tmp_path / "labels.npy")}})
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["runs"] == 3 and 0 < row["p50_ms"] and row["peak_rss_mb"] >= result["rss_before_load_mb"]
        if backend == "openvino":  # OpenVINO's own latency of each timed call, inside the host-timed window
            assert 0 < row["runtime_p50_ms"] <= row["p50_ms"]
        else:
            assert row["runtime_p50_ms"] is None
    assert result["top1"] == 100.0  # 5 images in batches of 2: the padded last batch scores like the rest
    np.testing.assert_allclose(get_backend(backend).load(Path(path), 1).run(images), reference, atol=1e-3)


def test_a_failing_artifact_is_reported_and_the_others_kept(export_dir, tmp_path):
    folder = copy_export(export_dir, tmp_path)
    broken = folder / "onnx-int8" / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    manifest = json.loads((folder / MANIFEST).read_text())
    record = next(r for r in manifest["artifacts"] if r["name"] == "onnx-int8")
    record["sha256"] = sha256(broken)  # the file is what the manifest lists, but no runtime can load it
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckFailed, match="onnx-int8 failed"):
        run_bench(folder, console=quiet(), **{**BENCH, "batches": [1], "backends": ["onnxruntime"]})
    report = json.loads((folder / "bench.json").read_text())
    assert [r["artifact"] for r in report["rows"]] == ["onnx-fp32"] and "onnx-int8" in report["failures"][0]


def test_compare_two_runs(export_dir, tmp_path):
    a = tmp_path / "a.json"
    shutil.copy(export_dir / "bench.json", a)
    b_report = json.loads(a.read_text())
    for row in b_report["rows"]:
        row["p50_ms"] /= 2  # B twice as fast
    b_report["rows"].append({**b_report["rows"][0], "artifact": "openvino-int8"})
    b = tmp_path / "b.json"
    b.write_text(json.dumps(b_report))
    rows = compare_reports(a, b, console=quiet())
    assert all(r["b_vs_a"] == pytest.approx(2.0) for r in rows if r["artifact"] != "openvino-int8")
    assert rows[-1]["artifact"] == "openvino-int8" and rows[-1]["a_p50_ms"] is None
    result = CliRunner().invoke(app, ["bench", "--compare", str(a), str(b)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "B speed-up" in result.output and "2.00x" in result.output
    (tmp_path / "broken.json").write_text("{")
    result = CliRunner().invoke(app, ["bench", "--compare", str(a), str(tmp_path / "broken.json")])
    assert result.exit_code == 2 and "bench.json" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("change", [{"path": "/elsewhere/student.pt"}, {"sha256": "0" * 64}], ids=["gone", "replaced"])
def test_bench_without_the_source_checkpoint_skips_pytorch(export_dir, tmp_path, change):
    folder = copy_export(export_dir, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["source_checkpoint"].update(change)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    rows = run_bench(folder, console=quiet(), **{**BENCH, "batches": [1], "val_samples": 0})
    assert [r["artifact"] for r in rows] == ["onnx-fp32", "onnx-int8"]
    assert all(r["top1"] is None for r in rows)  # val_samples=0: no top-1 column, no plot
    assert "top-1 %" not in (folder / "bench.md").read_text() and not (folder / "bench.png").exists()


def test_bench_refuses_a_modified_artifact(export_dir, tmp_path):
    folder = copy_export(export_dir, tmp_path)
    with open(folder / "onnx-int8" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="sha256"):
        run_bench(folder, console=quiet(), **BENCH)


def test_bench_refuses_an_unknown_backend(export_dir, tmp_path):
    folder = copy_export(export_dir, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["artifacts"][0]["backend"] = "tflite"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="Unknown backend `tflite`"):
        run_bench(folder, console=quiet(), **BENCH)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something/1"}),
                                     json.dumps({"format": "kd2deploy.manifest/1"})])
def test_bench_refuses_a_broken_manifest(tmp_path, content):
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(UserError, match=MANIFEST):
        run_bench(tmp_path, console=quiet(), **BENCH)
