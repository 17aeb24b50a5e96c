"""Deploy backends: OpenVINO (FP32/FP16 IR, NNCF INT8, accuracy control), TensorRT up to the engine build, target
profiles, ONNX options (calibration methods, excluded ops, dynamic size) and adding artifacts to an export folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import quiet, requires_openvino, train_run
from typer.testing import CliRunner

from kd2deploy.backends import BackendUnavailable, ExportRequest, backend_for_format, get_backend
from kd2deploy.backends.ort import OnnxRuntimeBackend, quantize_qdq
from kd2deploy.backends.trt import TensorRtBackend, build_engine, build_settings, trtexec_command
from kd2deploy.bench.accuracy import evaluate_target
from kd2deploy.checkpoint import sha256
from kd2deploy.cli import app
from kd2deploy.data.sources import DataInfo
from kd2deploy.deploy.manifest import MANIFEST
from kd2deploy.deploy.pipeline import export_run
from kd2deploy.deploy.profiles import list_profiles, load_profile, resolve_ort_preset
from kd2deploy.errors import UserError

VAL = 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("backends"), data={"train_subset": 128})


@pytest.fixture(scope="module")
def cpu_export(run_dir: Path, tmp_path_factory) -> dict:
    """Every CPU format and precision, plus TensorRT (which stops before its engine build here)."""
    out = tmp_path_factory.mktemp("cpu") / "export"
    with pytest.raises(BackendUnavailable) as raised:
        export_run(run_dir, out_dir=out, formats=["onnx", "openvino", "tensorrt"], precisions=["fp32", "fp16", "int8"],
                   profile="laptop-x86", calib_samples=32, val_samples=VAL, speed=False, console=quiet())
    return {"out": out, "manifest": json.loads((out / MANIFEST).read_text()), "error": str(raised.value)}


def record(manifest: dict, name: str) -> dict:
    return next(a for a in manifest["artifacts"] if a["name"] == name)


# ----------------------------------------------------------------------------------------- target profiles
def test_bundled_target_profiles_load():
    assert set(list_profiles()) >= {"laptop-x86", "arm64-cpu", "jetson-orin", "rtx-gpu"}
    for name in list_profiles():
        profile = load_profile(name)
        assert profile.name == name and profile.formats and profile.precisions
    assert load_profile("jetson-orin").device == "cuda" and load_profile("jetson-orin").tensorrt.batch.max == 8
    assert load_profile("arm64-cpu").onnxruntime.int8_preset == "arm64"


def test_target_profile_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(UserError, match=r"Unknown export target `pi-zero`.*laptop-x86"):
        load_profile("pi-zero")
    broken = tmp_path / "mine.yaml"
    broken.write_text("name: mine\nformats: [onnx, tflite]\ntensorrt: {batch: {min: 4, opt: 2, max: 8}}\n")
    with pytest.raises(UserError, match=r"mine\.yaml: field `formats\.1`.*field `tensorrt\.batch`"):
        load_profile(str(broken))
    result = CliRunner().invoke(app, ["export", "nowhere", "--target", str(broken)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_auto_preset_follows_the_cpu(monkeypatch):
    monkeypatch.setattr("kd2deploy.deploy.profiles.platform.machine", lambda: "x86_64")
    for flags, preset in [(["avx2", "avx512f", "avx512_vnni"], "avx512_vnni"), (["avx2", "avx512f"], "avx512"),
                          (["avx2"], "avx2")]:
        monkeypatch.setattr("kd2deploy.deploy.profiles.cpu_flags", lambda flags=flags: flags)
        assert resolve_ort_preset("auto") == preset
    monkeypatch.setattr("kd2deploy.deploy.profiles.platform.machine", lambda: "aarch64")
    assert resolve_ort_preset("auto") == "arm64" and resolve_ort_preset("avx2") == "avx2"


def test_unknown_format_and_precision_are_user_errors(run_dir):
    with pytest.raises(UserError, match="--format takes"):
        export_run(run_dir, formats=["tflite"], console=quiet())
    with pytest.raises(UserError, match="--precision takes"):
        export_run(run_dir, precisions=["int4"], console=quiet())
    with pytest.raises(UserError, match="Unknown export format `coreml`"):
        backend_for_format("coreml")


# ----------------------------------------------------------------------------------------- OpenVINO
@requires_openvino
def test_openvino_ir_in_three_precisions_matches_pytorch(cpu_export):
    manifest, out = cpu_export["manifest"], cpu_export["out"]
    for precision in ("fp32", "fp16", "int8"):
        r = record(manifest, f"openvino-{precision}")
        assert r["file"] == f"openvino-{precision}/model.xml" and r["backend"] == "openvino"
        (bin_file, digest), = r["companions"].items()
        assert bin_file.endswith("model.bin") and digest == sha256(out / bin_file)
        assert r["size_bytes"] == (out / r["file"]).stat().st_size + (out / bin_file).stat().st_size
        assert r["verification"]["samples"] == VAL
    fp32, fp16, int8 = (record(manifest, f"openvino-{p}") for p in ("fp32", "fp16", "int8"))
    assert fp32["verification"]["passed"] and fp32["verification"]["max_abs_diff"] < 1e-3
    assert fp16["verification"]["passed"] and fp16["verification"]["atol"] == 5e-2
    assert fp16["companions"] and fp16["size_bytes"] < 0.7 * fp32["size_bytes"]  # FP16 weights
    assert int8["verification"]["top1_agreement"] >= 80
    assert int8["quantization"]["calibration_images"] == 32 and int8["quantization"]["model_type"] == "cnn"
    runner = get_backend("openvino").load(out / int8["file"], threads=1)
    for batch in (1, 3):  # one compiled model per batch size
        assert runner.run(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 10)


@requires_openvino
def test_openvino_accuracy_control_and_calibration_method(run_dir, tmp_path):
    manifest = export_run(run_dir, out_dir=tmp_path / "export", formats=["openvino"], precisions=["int8"],
                          calib_samples=16, calib_method="percentile", max_drop=1.0, val_samples=32, speed=False,
                          console=quiet())
    quantization = record(manifest, "openvino-int8")["quantization"]
    assert quantization["range_estimator"] == "MEAN_QUANTILE"
    assert quantization["accuracy_control"] == {"max_drop": 1.0, "metric": "top-1 %", "val_images": 32}
    assert record(manifest, "openvino-int8")["verification"]["top1_drop"] <= 1.0 + 1e-9


@requires_openvino
def test_eval_shows_the_export_verification(cpu_export):
    out = cpu_export["out"]
    result = evaluate_target(out / "openvino-fp32" / "model.xml", val_samples=VAL, console=quiet())["results"]
    assert len(result) == 1 and result[0]["artifact"] == "openvino-fp32"
    assert result[0]["top1"] == pytest.approx(result[0]["export_check"]["top1"])  # same images, same artifact
    cli = CliRunner().invoke(app, ["eval", str(out), "--val-samples", str(VAL)], env={"COLUMNS": "250"})
    assert cli.exit_code == 0 and "max |Δ logit|" in cli.output and "top-1 agreement" in cli.output


# ----------------------------------------------------------------------------------------- TensorRT
def test_tensorrt_stops_before_the_engine_with_a_verified_qdq_graph(cpu_export):
    manifest, out = cpu_export["manifest"], cpu_export["out"]
    if TensorRtBackend.unavailable() is None:
        pytest.skip("TensorRT and a GPU are present: the engine build path is exercised instead")
    assert "No TensorRT engine was built" in cpu_export["error"] and "--format tensorrt" in cpu_export["error"]
    qdq = record(manifest, "onnx-int8-tensorrt")
    assert qdq["intermediate"] and qdq["backend"] == "onnxruntime"
    assert qdq["quantization"]["preset"] == "tensorrt" and qdq["quantization"]["activation_symmetric"]
    graph = onnx.load(out / qdq["file"]).graph
    quantize_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for node in quantize_nodes:  # TensorRT's explicit quantization: signed INT8, zero point 0
        zero_point = initializers[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()
    # Q/DQ pairs on the weights too (float weights through QuantizeLinear): a DequantizeLinear reads either a
    # QuantizeLinear or an int32 bias, never a pre-quantized int8 weight
    producer = {output: n.op_type for n in graph.node for output in n.output}
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert any(producer.get(n.input[0]) == "QuantizeLinear" for n in dequantize)
    assert all(producer.get(n.input[0]) == "QuantizeLinear" or initializers[n.input[0]].dtype == np.int32
               for n in dequantize)
    weight_inputs = {n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert weight_inputs and all(producer.get(w) == "DequantizeLinear" for w in weight_inputs)
    assert qdq["verification"]["top1_agreement"] >= 80
    assert not any(a["backend"] == "tensorrt" for a in manifest["artifacts"])


def test_tensorrt_cli_exits_2_and_keeps_what_it_built(run_dir, tmp_path):
    if TensorRtBackend.unavailable() is None:
        pytest.skip("TensorRT and a GPU are present")
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "tensorrt", "--precision", "fp16",
                                      "--out", str(out), "--val-samples", "16", "--no-speed-check"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "TensorRT is not installed" in result.output or "no CUDA GPU" in result.output
    assert [a["name"] for a in json.loads((out / MANIFEST).read_text())["artifacts"]] == ["onnx-fp32"]


def test_tensorrt_build_settings_and_trtexec_command(tmp_path):
    info = DataInfo("cifar10", 10, [str(i) for i in range(10)], 32, (0.5,) * 3, (0.5,) * 3)
    request = ExportRequest(tmp_path / "model.onnx", info, tmp_path, profile=load_profile("jetson-orin"))
    settings = build_settings(request, "int8")
    assert settings["flags"] == ["FP16", "INT8"] and settings["workspace_mib"] == 1024
    assert settings["shapes"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [8, 3, 32, 32]}
    command = trtexec_command(Path("q.onnx"), Path("e.engine"), settings)
    assert command[:3] == ["trtexec", "--onnx=q.onnx", "--saveEngine=e.engine"]
    assert {"--minShapes=input:1x3x32x32", "--maxShapes=input:8x3x32x32", "--fp16", "--int8",
            "--memPoolSize=workspace:1024M"} <= set(command)


@pytest.mark.skipif(TensorRtBackend.unavailable() is not None,
                    reason=f"engine build needs TensorRT and a CUDA GPU: {TensorRtBackend.unavailable()}")
def test_tensorrt_engine_build_and_run(cpu_export, tmp_path):
    out = cpu_export["out"]
    info = DataInfo("cifar10", 10, [str(i) for i in range(10)], 32, (0.5,) * 3, (0.5,) * 3)
    request = ExportRequest(out / "onnx-fp32/model.onnx", info, tmp_path, profile=load_profile("rtx-gpu"))
    engine = tmp_path / "model.engine"
    build_engine(request.onnx_path, engine, build_settings(request, "fp16"))
    logits = TensorRtBackend.load(engine).run(np.zeros((2, 3, 32, 32), np.float32))
    reference = OnnxRuntimeBackend.load(request.onnx_path).run(np.zeros((2, 3, 32, 32), np.float32))
    np.testing.assert_allclose(logits, reference, atol=5e-2)


# ----------------------------------------------------------------------------------------- ONNX options
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_ort_calibration_methods_and_excluded_ops(cpu_export, tmp_path, method):
    fp32 = cpu_export["out"] / "onnx-fp32/model.onnx"
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((8, 3, 32, 32), dtype=np.float32) for _ in range(2)]
    out = tmp_path / "int8.onnx"
    settings = quantize_qdq(fp32, out, calibration, "avx512_vnni", method, exclude_op_types=["Add"])
    assert settings["calibration_method"] == method and settings["calibration_images"] == 16
    assert settings["excluded_op_types"] == ["Add"] and settings["weight_type"] == "QInt8"
    graph = onnx.load(out).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    quantized_inputs = {producers.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "Add" not in quantized_inputs, "an excluded op's output stays float"
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producers.get(n.input[0]) == "DequantizeLinear" for n in convs)


def test_dynamic_spatial_size(run_dir, tmp_path):
    manifest = export_run(run_dir, out_dir=tmp_path / "export", formats=["onnx"], precisions=["fp32"],
                          dynamic_size=True, val_samples=16, speed=False, console=quiet())
    r = record(manifest, "onnx-fp32")
    assert r["dynamic_size"] and r["verification"]["passed"]
    runner = OnnxRuntimeBackend.load(tmp_path / "export" / r["file"])
    assert runner.run(np.zeros((1, 3, 48, 40), np.float32)).shape == (1, 10)


@requires_openvino
def test_export_folder_gains_artifacts_and_keeps_the_others(cpu_export, tmp_path):
    folder = Path(shutil.copytree(cpu_export["out"], tmp_path / "export"))
    before = {a["name"]: a["sha256"] for a in json.loads((folder / MANIFEST).read_text())["artifacts"]}
    shutil.rmtree(folder / "openvino-fp16")
    manifest = export_run(folder, formats=["openvino"], precisions=["fp16"], val_samples=16, speed=False,
                          console=quiet())
    after = {a["name"]: a["sha256"] for a in manifest["artifacts"]}
    assert set(after) == set(before) and (folder / "openvino-fp16/model.xml").is_file()
    assert all(after[name] == before[name] for name in before if name not in ("openvino-fp16", "onnx-fp32"))
    assert manifest["reference"]["backend"] == "onnxruntime"  # no PyTorch weights needed on a device
    assert record(manifest, "openvino-fp16")["verification"]["passed"]
