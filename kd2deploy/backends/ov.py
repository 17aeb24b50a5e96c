"""OpenVINO: IR (FP32, FP16 weights) converted from the ONNX graph, INT8 from NNCF post-training quantization
(optionally accuracy-controlled); runs .xml IR files on the CPU (or another OpenVINO device)."""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .base import Backend, ExportRequest, artifact_record, host_timings, register_backend

IR_FILE = "model.xml"
INSTALL_HINT = 'pip install "kd2deploy[openvino]" (OpenVINO and NNCF)'
# NNCF has no KL-divergence calibrator; its histogram estimator (optimal ranges from activation histograms) is the
# closest to `entropy`
RANGE_ESTIMATORS = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}


def _images(batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Batch-1 items: NNCF collects statistics per item, and its subset_size counts items."""
    for batch in batches:
        yield from (batch[i:i + 1] for i in range(len(batch)))


def has_attention(model) -> bool:
    """Whether the graph has attention (OpenVINO's fused ScaledDotProductAttention, or Softmax next to MatMuls):
    NNCF quantizes those with its transformer preset."""
    ops = {op.get_type_name() for op in model.get_ops()}
    return "ScaledDotProductAttention" in ops or {"Softmax", "MatMul"} <= ops


def _range_estimator(calib_method: str):
    """NNCF's activation range estimator for a calibration method."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    estimator = getattr(RangeEstimatorParametersSet, RANGE_ESTIMATORS[calib_method])
    return AdvancedQuantizationParameters(activations_range_estimator_params=estimator)


def _top1(compiled, items: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
    """NNCF's validation_fn: (top-1 %, per-item correctness), so it can rank which layers cost accuracy."""
    per_item = [100.0 * float(np.asarray(compiled(images)[0]).argmax(axis=1)[0] == labels[0])
                for images, labels in items]
    return float(np.mean(per_item)) if per_item else 0.0, per_item


def _labelled_images(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(images[i:i + 1], labels[i:i + 1]) for images, labels in batches for i in range(len(labels))]


def quantize_int8(model, request: ExportRequest, transformer: bool) -> tuple[Any, dict[str, Any]]:
    """NNCF INT8 of an OpenVINO model, calibrated on real training images; with request.max_drop, NNCF's
    accuracy-controlled quantization keeps the layers that cost the most top-1 in float until the drop on the val
    split is within max_drop points."""
    if importlib.util.find_spec("nncf") is None:
        raise UserError(f"OpenVINO INT8 needs NNCF, which is not installed: {INSTALL_HINT}.")
    import nncf

    images = list(_images(request.calibration_batches()))
    calibration = nncf.Dataset(images)
    kwargs: dict[str, Any] = {"subset_size": len(images),
                              "model_type": nncf.ModelType.TRANSFORMER if transformer else None}
    advanced = _range_estimator(request.calib_method)
    details: dict[str, Any] = {"tool": f"nncf {nncf.__version__}",
                               "model_type": "transformer" if transformer else "cnn",
                               "calibration_method": request.calib_method, "calibration_images": len(images),
                               "range_estimator": RANGE_ESTIMATORS[request.calib_method]}
    if request.max_drop is None:
        return nncf.quantize(model, calibration, advanced_parameters=advanced, **kwargs), details
    if request.validation is None:
        raise ValueError("Accuracy-controlled quantization needs val batches (ExportRequest.validation).")
    val_items = _labelled_images(request.validation())
    quantized = nncf.quantize_with_accuracy_control(
        model, calibration, nncf.Dataset(val_items, lambda item: item[0]), _top1,
        max_drop=request.max_drop, drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
        **kwargs)
    return quantized, {**details, "accuracy_control": {"max_drop": request.max_drop, "metric": "top-1 %",
                                                       "val_images": len(val_items)}}


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    format, suffix = "openvino", ".xml"
    precisions = ("fp32", "fp16", "int8")
    extra, packages, marker = "openvino", ("openvino", "nncf"), "^"
    timing_method = ("host wall clock per inference of a resident input (set on the request once, logits copied "
                     "out), as benchmark_app's inference-only mode; OpenVINO's own request latency alongside")

    def __init__(self, model, device: str = "CPU", threads: int = 0, hint: str = "LATENCY"):
        import openvino as ov

        self.core, self.model, self.device = ov.Core(), model, device
        self.config = self.compile_config(device, threads, hint)
        self._requests: dict[tuple[int, ...], Any] = {}
        self._bound: np.ndarray | None = None  # the batch the request's input tensor points at

    @staticmethod
    def compile_config(device: str = "CPU", threads: int = 0, hint: str = "LATENCY") -> dict[str, str]:
        """The properties every IR is compiled with. bench/bench_matrix.py hands the same dict to benchmark_app
        (-load_config), so the two time the same compiled model."""
        config = {"PERFORMANCE_HINT": hint}
        if device == "CPU":
            # FP32 and FP16 IR run in f32: CPUs with BF16/AMX would otherwise silently compute in bfloat16
            config["INFERENCE_PRECISION_HINT"] = "f32"
            if threads > 0:
                config["INFERENCE_NUM_THREADS"] = str(threads)
        return config

    @classmethod
    def unavailable(cls) -> str | None:
        # running an IR needs OpenVINO only; NNCF is checked when an INT8 IR is built
        return None if importlib.util.find_spec("openvino") else f"openvino is not installed: {INSTALL_HINT}"

    @classmethod
    def export(cls, request: ExportRequest) -> list[dict[str, Any]]:
        import openvino as ov

        out, records = request.out_dir, []
        converted = ov.convert_model(request.onnx_path)
        transformer = has_attention(converted)
        for precision in (p for p in cls.precisions if p in request.precisions):
            model = converted.clone()  # each precision transforms its own copy of the one conversion
            details: dict[str, Any] = {"openvino": ov.__version__}
            if precision == "int8":
                model, details["quantization"] = quantize_int8(model, request, transformer)
            path = out / f"openvino-{precision}" / IR_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            # save_model writes .xml and .bin side by side; the folder is a staging folder, renamed when complete
            ov.save_model(model, str(path), compress_to_fp16=precision == "fp16")
            records.append(artifact_record(path, out, name=f"openvino-{precision}", backend=cls.name,
                                           file_format="openvino", precision=precision,
                                           companions=(path.with_suffix(".bin"),), **details))
        return records

    @classmethod
    def load(cls, path: Path, threads: int = 0, device: str = "CPU") -> OpenVinoBackend:
        reason = cls.unavailable()
        if reason:
            raise UserError(f"{path} is an OpenVINO IR, but {reason}.")
        import openvino as ov

        return cls(ov.Core().read_model(str(path)), device, threads)

    def request_for(self, shape: tuple[int, ...]):
        """One compiled model and infer request per input shape: static shapes let the CPU plugin pick its fastest
        kernels, and a kept request reuses its buffers, as benchmark_app's does."""
        if shape not in self._requests:
            model = self.model.clone()
            model.reshape({0: list(shape)})
            self._requests[shape] = self.core.compile_model(model, self.device, self.config).create_infer_request()
        return self._requests[shape]

    def _bind(self, batch: np.ndarray):
        """The request for this batch's shape, its input tensor sharing the batch's memory (no copy)."""
        import openvino as ov

        request = self.request_for(tuple(batch.shape))
        self._bound = np.ascontiguousarray(batch, dtype=np.float32)  # the tensor borrows this memory: keep it alive
        request.set_input_tensor(ov.Tensor(self._bound, shared_memory=True))
        return request

    @staticmethod
    def _infer(request) -> np.ndarray:
        # sync infer, as benchmark_app's latency mode (start_async + wait hands the work to another thread, which
        # measured ~0.02 ms slower); the logits are copied out of the request's buffer, which the next call reuses
        return np.array(request.infer(share_outputs=True)[0], dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._infer(self._bind(batch))

    def time_batch(self, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None) -> list[float]:
        """Host seconds per inference of `batch` bound once, and, in runtime_timings, OpenVINO's own latency of
        each of those calls (InferRequest.latency, what benchmark_app reports): their gap is the Python call."""
        request = self._bind(batch)
        runtime: list[float] = []

        def infer(_: np.ndarray) -> None:
            self._infer(request)
            runtime.append(request.latency / 1e3)  # reported in ms

        times = host_timings(infer, batch, iters, warmup, duration)
        self.runtime_timings = runtime[-len(times):]  # the timed calls, warm-up dropped
        return times
