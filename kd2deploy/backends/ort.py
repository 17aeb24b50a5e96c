"""ONNX Runtime: exports the student to ONNX (FP32) and static INT8 (QDQ), and runs .onnx files."""
from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from rich.console import Console
from torch import nn

from ..checkpoint import atomic_write
from ..data import DataInfo
from .base import CHANNELS, Backend, ExportRequest, artifact_record, register_backend

# 18 is the opset torch's dynamo exporter (torchlib) is written in: higher opsets need a version-conversion pass
# after export, and 18 already runs on every runtime kd2deploy targets (ONNX Runtime >= 1.14, OpenVINO, TensorRT 8.6+).
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
FP32_FILE, INT8_FILE = "model_fp32.onnx", "model_int8.onnx"

# Static INT8 settings. QDQ is the format ONNX Runtime's CPU kernels are optimised for, and the one TensorRT and
# OpenVINO read too. On x86, uint8 activations x int8 weights is the pairing the VPMADDUBSW/VNNI kernels take;
# reduce_range (7-bit weights) avoids the int16 saturation of that instruction on CPUs without VNNI, so one
# artifact is safe on any x86 machine, at a small accuracy cost that per-channel weight scales recover.
INT8_SETTINGS = {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QUInt8,
                 "weight_type": QuantType.QInt8, "per_channel": True, "reduce_range": True,
                 "calibrate_method": CalibrationMethod.MinMax}
INT8_EXTRA_OPTIONS = {
    # the same ranges as keeping every intermediate output at once, in bounded memory on large inputs
    "CalibMaxIntermediateOutputs": 8,
    # LayerNorm scales are 1-D: channel axis 0, not the default 1 (which logs a warning per ViT block)
    "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0},
}


@contextlib.contextmanager
def _exporter_prints_hidden() -> Iterator[None]:
    """Swallow the exporter's progress prints and warnings; its exceptions still propagate."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def export_onnx(model: nn.Module, info: DataInfo, path: Path, console: Console) -> str:
    """Write `model` as a single-file ONNX graph with a dynamic batch dimension; returns the exporter used.

    The dynamo exporter comes first; a model it cannot capture falls back to the TorchScript exporter."""
    example = (torch.zeros(2, CHANNELS, info.img_size, info.img_size),)  # batch 2: a batch of 1 could be specialised
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": OPSET}

    def dynamo(tmp: Path) -> None:
        torch.onnx.export(model, example, tmp, dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **names)

    def torchscript(tmp: Path) -> None:
        torch.onnx.export(model, example, tmp, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **names)

    try:
        with _exporter_prints_hidden():
            atomic_write(path, dynamo)
        exporter = "dynamo"
    except Exception as exc:  # the dynamo exporter raises many types; the fallback reports its own errors
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        console.print(f"[yellow]The dynamo ONNX exporter failed ({type(exc).__name__}: {first_line}); "
                      "falling back to the TorchScript exporter.[/yellow]")
        with _exporter_prints_hidden():
            atomic_write(path, torchscript)
        exporter = "torchscript"
    onnx.checker.check_model(str(path), full_check=True)
    return exporter


class _CalibrationReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator, one {input name: batch} dict at a time."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = iter(batches)
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Iterable[np.ndarray]) -> dict[str, Any]:
    """Static INT8 (QDQ) from the FP32 model, calibrated with MinMax on `calibration`; returns the settings used."""
    reader = _CalibrationReader(calibration)
    with tempfile.TemporaryDirectory(prefix="kd2deploy-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph cleanup the quantizer expects
        atomic_write(int8_path, lambda tmp: quantize_static(str(prepared), str(tmp), reader, **INT8_SETTINGS,
                                                            extra_options=INT8_EXTRA_OPTIONS))
    settings = {key: getattr(value, "name", value) for key, value in INT8_SETTINGS.items()}
    return {**settings, "calibration_images": reader.images}


def _providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def export(cls, request: ExportRequest) -> list[dict[str, Any]]:
        """FP32 ONNX always (INT8 is quantized from it), plus INT8 when requested."""
        out = request.out_dir
        fp32 = out / FP32_FILE
        exporter = export_onnx(request.model, request.info, fp32, request.console)
        common = {"backend": cls.name, "file_format": "onnx", "opset": OPSET, "exporter": exporter}
        records = [artifact_record(fp32, out, name="onnx-fp32", precision="fp32", **common)]
        if "int8" in request.precisions:
            if request.calibration is None:
                raise ValueError("INT8 export needs calibration batches (ExportRequest.calibration).")
            settings = quantize_int8(fp32, out / INT8_FILE, request.calibration())
            records.append(artifact_record(out / INT8_FILE, out, name="onnx-int8", precision="int8",
                                           quantization=settings, **common))
        return records

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> OnnxRuntimeBackend:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return cls(ort.InferenceSession(str(path), options, providers=_providers()))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
