"""Export: the ONNX graph and ONNX Runtime INT8, parity with PyTorch on real images, manifest.json, and
`kd2deploy eval`. OpenVINO, TensorRT and target profiles are in test_backends.py."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import quiet, train_run
from typer.testing import CliRunner

from kd2deploy.backends import get_backend
from kd2deploy.backends.ort import OnnxRuntimeBackend
from kd2deploy.bench.accuracy import evaluate_target
from kd2deploy.bench.resolve import manifest_val_set
from kd2deploy.checkpoint import load_checkpoint, sha256
from kd2deploy.cli import app
from kd2deploy.data.sources import DataInfo
from kd2deploy.deploy.manifest import MANIFEST
from kd2deploy.deploy.onnx import export_onnx
from kd2deploy.deploy.pipeline import ExportVerificationError, export_run
from kd2deploy.errors import UserError
from kd2deploy.student import load_student

PARITY_SAMPLES = 128


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def manifest(run_dir: Path) -> dict:
    return export_run(run_dir, formats=["onnx"], precisions=["fp32", "int8"], calib_samples=64,
                      val_samples=PARITY_SAMPLES, console=quiet())


@pytest.fixture(scope="module")
def export_dir(manifest: dict) -> Path:
    return Path(manifest["artifact_dir"])


def artifact(manifest: dict, precision: str) -> dict:
    return next(a for a in manifest["artifacts"] if a["precision"] == precision)


def artifact_file(export_dir: Path, name: str) -> str:
    return next(a["file"] for a in json.loads((export_dir / MANIFEST).read_text())["artifacts"] if a["name"] == name)


def test_onnx_files_are_valid_with_a_dynamic_batch(manifest, export_dir):
    for record in manifest["artifacts"]:
        path = export_dir / record["file"]
        model = onnx.load(path)
        onnx.checker.check_model(model)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch dimension must be symbolic"
        runner = get_backend(record["backend"]).load(path)
        for batch in (1, 3):
            logits = runner.run(np.zeros((batch, 3, 32, 32), np.float32))
            assert logits.shape == (batch, 10) and logits.dtype == np.float32


def test_fp32_matches_pytorch_on_real_images(manifest, export_dir, run_dir):
    record = artifact(manifest, "fp32")
    check = record["verification"]
    assert check["passed"] and check["samples"] == PARITY_SAMPLES
    assert 0 <= check["max_abs_diff"] < check["atol"] == 1e-3
    assert check["top1"] == pytest.approx(manifest["reference"]["top1"]) and check["top1_agreement"] == 100
    assert record["exporter"] == "dynamo" and record["opset"] == 18 and record["simplified"].startswith("onnxslim")

    # independently of the manifest: the same val images through both runtimes
    images = next(manifest_val_set(manifest, export_dir, samples=16).batches(16))[0]
    onnx_logits = get_backend("onnxruntime").load(export_dir / artifact(manifest, "fp32")["file"]).run(images)
    torch_logits = get_backend("pytorch").load(run_dir).run(images)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3, rtol=0)


def test_int8_is_quantized_and_agrees_with_fp32(manifest, export_dir):
    record = artifact(manifest, "int8")
    optimum = importlib.util.find_spec("optimum") is not None  # without it, the CPU presets fall back to portable
    model = onnx.load(export_dir / record["file"])
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in model.graph.node}
    assert record["size_bytes"] < 0.5 * artifact(manifest, "fp32")["size_bytes"]
    quantization = record["quantization"]
    assert quantization["quant_format"] == "QDQ" and quantization["calibration_images"] == 64
    cpu_presets = ("avx2", "avx512", "avx512_vnni", "arm64") if optimum else ("portable",)
    assert quantization["preset"] in cpu_presets and quantization["per_channel"]
    check = record["verification"]
    assert check["samples"] == PARITY_SAMPLES and check["top1_agreement"] >= 80
    assert check["top1_drop"] == pytest.approx(manifest["reference"]["top1"] - check["top1"])


def test_int8_is_timed_against_fp32_and_the_faster_recommended(manifest):
    fp32, int8 = artifact(manifest, "fp32"), artifact(manifest, "int8")
    assert fp32["speed"]["median_ms"] > 0 and int8["speed"]["median_ms"] > 0 and int8["speed"]["batch"] == 1
    assert int8["speed"]["speedup_vs_fp32"] == pytest.approx(fp32["speed"]["median_ms"] / int8["speed"]["median_ms"])
    faster = int8 if int8["speed"]["speedup_vs_fp32"] > 1 else fp32
    assert manifest["recommended"] == {"onnxruntime": faster["name"]}


def test_slower_int8_is_reported_and_fp32_recommended(run_dir, tmp_path, monkeypatch):
    timings = iter([1.0, 2.0])  # fp32 first, then int8: INT8 twice as slow
    monkeypatch.setattr("kd2deploy.deploy.pipeline.median_latency_ms", lambda runner, shape: next(timings))
    console = quiet()
    manifest = export_run(run_dir, out_dir=tmp_path / "export", formats=["onnx"], precisions=["fp32", "int8"],
                          calib_samples=16, val_samples=16, console=console)
    assert manifest["recommended"] == {"onnxruntime": "onnx-fp32"}
    assert artifact(manifest, "int8")["speed"]["speedup_vs_fp32"] == pytest.approx(0.5)
    output = " ".join(console.file.getvalue().split())
    assert "onnx-int8 is not faster than onnx-fp32 on this machine (2.00 ms vs 1.00 ms at batch 1): use onnx-fp32" \
        in output


def test_manifest_describes_the_files(manifest, export_dir, run_dir):
    on_disk = json.loads((export_dir / MANIFEST).read_text())
    assert on_disk["format"] == "kd2deploy.manifest/1"
    assert on_disk["model"]["name"] == "test_resnet" and on_disk["model"]["params"] > 0
    assert on_disk["input"]["shape"] == [3, 32, 32] and on_disk["input"]["layout"] == "NCHW"
    student = load_checkpoint(run_dir / "student.pt")
    assert on_disk["class_names"] == student["data"]["class_names"]
    assert on_disk["input"]["mean"] == student["data"]["mean"]
    assert on_disk["data"] == student["recipe"]["data"]
    assert on_disk["source_checkpoint"] == {"path": str((run_dir / "student.pt").resolve()),
                                            "sha256": sha256(run_dir / "student.pt")}
    assert "torch" in on_disk["versions"] and "onnxruntime" in on_disk["versions"]
    assert [a["name"] for a in on_disk["artifacts"]] == ["onnx-fp32", "onnx-int8"]
    for record in on_disk["artifacts"]:
        path = export_dir / record["file"]
        assert path.parent.name == record["name"], "one folder per artifact"
        assert record["sha256"] == sha256(path) and record["size_bytes"] == path.stat().st_size
    assert on_disk["target"]["name"] in ("laptop-x86", "arm64-cpu") and on_disk["data_info"] == student["data"]
    assert not list(export_dir.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_parity_failure_raises_and_keeps_the_previous_export(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / MANIFEST).write_text("{}")  # an earlier export: a failed one must leave it as it was
    run = OnnxRuntimeBackend.run
    monkeypatch.setattr(OnnxRuntimeBackend, "run", lambda self, batch: run(self, batch) + 0.01)
    with pytest.raises(ExportVerificationError, match=r"atol=0\.001.*previous export there is unchanged"):
        export_run(run_dir, out_dir=out, formats=["onnx"], precisions=["fp32"], val_samples=8, console=quiet())
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in out.iterdir()] == [MANIFEST]
    assert (out / MANIFEST).read_text() == "{}"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--val-samples", "8",
                                      "--format", "onnx", "--precision", "fp32"])
    assert result.exit_code == 1 and "failed:" in result.output and "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the fallback is the legacy exporter, on purpose
def test_dynamo_failure_falls_back_to_torchscript(run_dir, tmp_path, monkeypatch):
    export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("unsupported operator")
        return export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model, ckpt = load_student(run_dir)
    console, path = quiet(), tmp_path / "model.onnx"
    assert export_onnx(model, DataInfo.from_dict(ckpt["data"]), path, console)["exporter"] == "torchscript"
    assert "falling back to the TorchScript exporter" in console.file.getvalue()
    assert OnnxRuntimeBackend.load(path).run(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 10)


def test_distilled_vit_exports_with_parity(tmp_path):
    run_dir = train_run(tmp_path, student={"name": "deit_nano_distilled_patch4_32"},
                        data={"train_subset": 32}, optim={"batch_size": 32})
    manifest = export_run(run_dir, formats=["onnx"], precisions=["fp32"], val_samples=32, speed=False,
                          console=quiet())
    check = artifact(manifest, "fp32")["verification"]
    assert check["passed"] and check["max_abs_diff"] < 1e-3


def test_evaluate_target_on_run_export_folder_and_onnx_file(manifest, export_dir, run_dir):
    student_top1 = load_checkpoint(run_dir / "student.pt")["metrics"]["val_top1"]
    run = evaluate_target(run_dir, console=quiet())["results"]
    assert len(run) == 1 and run[0]["backend"] == "pytorch"
    assert run[0]["top1"] == pytest.approx(student_top1)  # the same val split as training evaluated

    # the export's own check ran on the same evenly spread val images
    exported = evaluate_target(export_dir, val_samples=PARITY_SAMPLES, console=quiet())["results"]
    assert [r["artifact"] for r in exported] == ["onnx-fp32", "onnx-int8"]
    for result, record in zip(exported, manifest["artifacts"], strict=True):
        assert result["count"] == PARITY_SAMPLES
        assert result["top1"] == pytest.approx(record["verification"]["top1"])

    single = evaluate_target(export_dir / artifact(manifest, "int8")["file"], val_samples=100, console=quiet())
    assert [(r["artifact"], r["count"]) for r in single["results"]] == [("onnx-int8", 100)]


def test_evaluate_target_rejects_other_paths(tmp_path, export_dir):
    with pytest.raises(UserError, match="run folder"):
        evaluate_target(tmp_path, console=quiet())
    stray = tmp_path / "stray.onnx"
    shutil.copy(export_dir / artifact_file(export_dir, "onnx-fp32"), stray)
    with pytest.raises(UserError, match=MANIFEST):
        evaluate_target(stray, console=quiet())


@pytest.mark.parametrize("command", [["export", "{missing}"], ["export", "{empty}"], ["bench", "{empty}"],
                                     ["eval", "{missing}"]])
def test_cli_bad_paths_exit_2_without_traceback(tmp_path, command):
    paths = {"missing": tmp_path / "nonexistent", "empty": tmp_path}
    result = CliRunner().invoke(app, [arg.format(**paths) for arg in command])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a UserError, not a crash
    assert "error:" in result.output and "Traceback" not in result.output
