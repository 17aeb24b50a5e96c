"""ONNX Runtime: the FP32 ONNX graph and static INT8 (QDQ) models tuned per CPU target; runs .onnx files."""
from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write
from ..deploy.profiles import resolve_ort_preset
from ..errors import UserError
from .base import INPUT_NAME, Backend, ExportRequest, artifact_record, register_backend

ONNX_FILE = "model.onnx"
# onnxruntime.quantization needs the onnx package, which running a model does not: it is imported only to quantize,
# so kd2deploy[edge] runs .onnx files without it. Its enums are named here and looked up then.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

# kd2deploy's own preset, for machines without optimum: uint8 activations x int8 weights is the pairing x86's
# VPMADDUBSW/VNNI kernels take; reduce_range (7-bit weights) avoids that instruction's int16 saturation on CPUs
# without VNNI, so one artifact is safe on any x86 machine, at a small accuracy cost per-channel scales recover.
PORTABLE_PRESET = {"quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                   "reduce_range": True,
                   "op_types_to_quantize": None, "extra_options": {}}
# TensorRT's explicit quantization takes symmetric int8 Q/DQ pairs only, one pair per consumer and on the weights
# too: optimum's `tensorrt` preset, built in here so that the TensorRT graph never depends on optimum being present
TENSORRT_PRESET = {"quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
                   "reduce_range": False, "op_types_to_quantize": None,
                   "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "AddQDQPairToWeight": True,
                                     "DedicatedQDQPair": True}}
EXTRA_OPTIONS = {
    # the same ranges as keeping every intermediate output at once, in bounded memory on large inputs
    "CalibMaxIntermediateOutputs": 8,
    # LayerNorm scales are 1-D: channel axis 0, not the default 1 (which logs a warning per ViT block)
    "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0},
}


def preset_settings(preset: str) -> tuple[str, dict[str, Any]]:
    """quantize_static settings for an optimum AutoQuantizationConfig preset (static, per-channel weights); the
    built-in `tensorrt` and `portable` presets; for a CPU preset without optimum-onnx installed, `portable`.
    Returns (preset used, settings)."""
    if preset not in ("portable", "tensorrt"):
        try:
            from optimum.onnxruntime.configuration import AutoQuantizationConfig
        except ImportError:
            preset = "portable"
        else:
            make = getattr(AutoQuantizationConfig, preset)
            # the tensorrt preset is static-only and takes no is_static argument
            config = make(per_channel=True) if preset == "tensorrt" else make(is_static=True, per_channel=True)
            return preset, {"quant_format": config.format, "activation_type": config.activations_dtype,
                            "weight_type": config.weights_dtype, "per_channel": config.per_channel,
                            "reduce_range": config.reduce_range, "op_types_to_quantize": config.operators_to_quantize,
                            "extra_options": {"ActivationSymmetric": config.activations_symmetric,
                                              "WeightSymmetric": config.weights_symmetric}}
    from onnxruntime.quantization import QuantFormat, QuantType

    settings = dict(TENSORRT_PRESET if preset == "tensorrt" else PORTABLE_PRESET)
    settings["quant_format"] = QuantFormat[settings["quant_format"]]
    settings["activation_type"], settings["weight_type"] = (QuantType[settings[k]] for k in ("activation_type",
                                                                                             "weight_type"))
    return preset, settings


def _calibration_reader(batches: Iterable[np.ndarray]):
    """Feeds calibration batches to onnxruntime's calibrator, one {input name: batch} dict at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class CalibrationReader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)
            self.images = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            self.images += len(batch)
            return {INPUT_NAME: batch}

    return CalibrationReader()


def _quantizable_op_types(settings: dict[str, Any], exclude: Iterable[str]) -> list[str] | None:
    excluded = set(exclude)
    if not excluded:
        return settings["op_types_to_quantize"]
    from onnxruntime.quantization.registry import QDQRegistry

    return [op for op in (settings["op_types_to_quantize"] or list(QDQRegistry)) if op not in excluded]


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: Iterable[np.ndarray], preset: str = "auto",
                 calib_method: str = "minmax", exclude_op_types: Iterable[str] = (),
                 exclude_nodes: Iterable[str] = ()) -> dict[str, Any]:
    """Static INT8 (QDQ) from the FP32 model after ONNX Runtime's pre-processing (symbolic shape inference and
    graph fusions), calibrated on `calibration`; returns the settings used, for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    used, settings = preset_settings(resolve_ort_preset(preset))
    op_types = _quantizable_op_types(settings, exclude_op_types)
    reader = _calibration_reader(calibration)
    extra = {**EXTRA_OPTIONS, **settings["extra_options"]}
    with tempfile.TemporaryDirectory(prefix="kd2deploy-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        atomic_write(out_path, lambda tmp: quantize_static(
            str(prepared), str(tmp), reader, quant_format=settings["quant_format"],
            activation_type=settings["activation_type"], weight_type=settings["weight_type"],
            per_channel=settings["per_channel"], reduce_range=settings["reduce_range"], op_types_to_quantize=op_types,
            nodes_to_exclude=list(exclude_nodes), calibrate_method=CalibrationMethod[CALIBRATION_METHODS[calib_method]],
            extra_options=extra))
    return {"preset": used, "quant_format": settings["quant_format"].name,
            "activation_type": settings["activation_type"].name, "weight_type": settings["weight_type"].name,
            "per_channel": settings["per_channel"], "reduce_range": settings["reduce_range"],
            "activation_symmetric": bool(extra.get("ActivationSymmetric", False)),
            "weight_symmetric": bool(extra.get("WeightSymmetric", False)),
            "excluded_op_types": sorted(set(exclude_op_types)), "excluded_nodes": list(exclude_nodes),
            "calibration_method": calib_method, "calibration_images": reader.images}


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    format, suffix = "onnx", ".onnx"
    precisions = ("fp32", "int8")
    extra, packages, marker = "edge", ("onnxruntime",), "s"

    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def export(cls, request: ExportRequest) -> list[dict[str, Any]]:
        """The FP32 graph itself (always: every other artifact is built from it), plus INT8 when requested."""
        out, settings = request.out_dir, request.profile.onnxruntime
        records = [artifact_record(request.onnx_path, out, name="onnx-fp32", backend=cls.name, file_format="onnx",
                                   precision="fp32")]
        if "int8" in request.precisions:
            path = out / "onnx-int8" / ONNX_FILE
            quantization = quantize_qdq(request.onnx_path, path, request.calibration_batches(),
                                        settings.int8_preset, request.calib_method, settings.exclude_op_types,
                                        settings.exclude_nodes)
            records.append(artifact_record(path, out, name="onnx-int8", backend=cls.name, file_format="onnx",
                                           precision="int8", quantization=quantization))
        return records

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return 'onnxruntime is not installed: pip install "kd2deploy[edge]" (or kd2deploy[train])'
        return None

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> OnnxRuntimeBackend:
        reason = cls.unavailable()
        if reason:
            raise UserError(f"{path} is an ONNX model, but {reason}.")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return cls(ort.InferenceSession(str(path), options, providers=_providers()))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]
