"""Bench: latency statistics, bench.md/bench.json for every artifact and batch size, manifest checks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import quiet, train_run

from kd2deploy.artifacts import MANIFEST
from kd2deploy.bench import latency_stats, run_bench
from kd2deploy.errors import UserError
from kd2deploy.exporting import export_run

BATCHES = [1, 3]
BENCH = {"batches": BATCHES, "iters": 5, "warmup": 1, "threads": 1, "val_samples": 50}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    run_dir = train_run(tmp_path_factory.mktemp("bench"), data={"train_subset": 64})
    manifest = export_run(run_dir, formats=["onnx"], precisions=["fp32", "int8"], calib_samples=32, val_samples=32,
                          speed=False, console=quiet())
    return Path(manifest["artifact_dir"])


def copy_export(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "export"))


def test_latency_stats_on_known_times():
    stats = latency_stats([0.001 * i for i in range(1, 11)], batch=4)  # 1..10 ms
    assert stats["p50_ms"] == pytest.approx(5.5)
    assert stats["p90_ms"] == pytest.approx(9.1)  # numpy's linear interpolation
    assert stats["mean_ms"] == pytest.approx(5.5)
    assert stats["images_per_s"] == pytest.approx(4 / 0.0055)


def test_bench_rows_and_reports(export_dir):
    rows = run_bench(export_dir, console=quiet(), **BENCH)
    assert [(r["artifact"], r["batch"]) for r in rows] == [
        (name, batch) for name in ("pytorch-fp32", "onnx-fp32", "onnx-int8") for batch in BATCHES]
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p90_ms"] and row["images_per_s"] > 0 and row["size_mb"] > 0
        assert 0 <= row["top1"] <= 100
    by_artifact = {r["artifact"]: r["top1"] for r in rows}
    assert by_artifact["onnx-fp32"] == pytest.approx(by_artifact["pytorch-fp32"], abs=2.0)  # 50 images: 1 may flip

    report = json.loads((export_dir / "bench.json").read_text())
    assert report["rows"] == rows
    assert report["context"]["threads"] == 1 and report["context"]["val_images"] == 50
    assert report["context"]["cores"] >= 1 and "onnxruntime" in report["context"]["versions"]
    markdown = (export_dir / "bench.md").read_text()
    assert "| artifact | backend | precision | batch | top-1 % | p50 ms | p90 ms | images/s | size MB |" in markdown
    assert markdown.count("| onnx-int8 |") == len(BATCHES)
    assert "Command: `" in markdown and report["context"]["cpu"] in markdown


@pytest.mark.parametrize("change", [{"path": "/elsewhere/student.pt"}, {"sha256": "0" * 64}], ids=["gone", "replaced"])
def test_bench_without_the_source_checkpoint_skips_pytorch(export_dir, tmp_path, change):
    folder = copy_export(export_dir, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["source_checkpoint"].update(change)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    rows = run_bench(folder, console=quiet(), **{**BENCH, "batches": [1]})
    assert [r["artifact"] for r in rows] == ["onnx-fp32", "onnx-int8"]


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
