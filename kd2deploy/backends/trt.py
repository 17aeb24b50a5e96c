"""TensorRT: FP32/FP16 engines from the ONNX graph and INT8 engines from an explicitly quantized (Q/DQ) ONNX graph;
runs .engine files on the GPU.

Engines are specific to the GPU and TensorRT version that built them, so they are built on the target (a Jetson,
an RTX box): `kd2deploy export EXPORT_DIR --format tensorrt` there reads the exported ONNX and manifest. INT8 uses
explicit quantization, since TensorRT deprecated its implicit calibrators: the Q/DQ graph comes from NVIDIA Model
Optimizer when installed, otherwise from ONNX Runtime's quantizer with optimum's `tensorrt` preset (symmetric INT8
activations and weights, per-channel). That graph is built and verified on any machine; only the engine build
needs TensorRT and a GPU.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write
from ..errors import CheckFailed, UserError
from ..onnx_export import INPUT_NAME
from .base import Backend, BackendUnavailable, ExportRequest, artifact_record, register_backend
from .ort import ONNX_FILE, quantize_qdq

ENGINE_FILE = "model.engine"
QDQ_NAME = "onnx-int8-tensorrt"  # the Q/DQ graph an INT8 engine is built from, itself runnable by ONNX Runtime
INSTALL_HINT = ("install TensorRT on the target (JetPack ships it on Jetson; `pip install tensorrt` on an RTX "
                "machine) and build there with `kd2deploy export EXPORT_DIR --format tensorrt --target NAME`")


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def tensorrt_version() -> str:
    if importlib.util.find_spec("tensorrt") is None:
        result = subprocess.run(["trtexec", "--version"], capture_output=True, text=True, check=False)
        return f"trtexec: {result.stdout.strip().splitlines()[0] if result.stdout.strip() else 'unknown version'}"
    import tensorrt as trt

    return trt.__version__


def quantize_for_tensorrt(request: ExportRequest, path: Path) -> dict[str, Any]:
    """The Q/DQ graph for an INT8 engine, calibrated on real training images."""
    method = {"minmax": "max", "entropy": "entropy"}.get(request.calib_method)
    if importlib.util.find_spec("modelopt") is not None and method is not None:
        from modelopt.onnx.quantization import quantize

        calibration = np.concatenate(list(request.calibration_batches()))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: quantize(str(request.onnx_path), quantize_mode="int8",
                                                calibration_data={INPUT_NAME: calibration},
                                                calibration_method=method, output_path=str(tmp)))
        return {"tool": "nvidia-modelopt", "calibration_method": method, "calibration_images": len(calibration)}
    settings = request.profile.onnxruntime
    return quantize_qdq(request.onnx_path, path, request.calibration_batches(), "tensorrt", request.calib_method,
                        settings.exclude_op_types, settings.exclude_nodes)


def build_settings(request: ExportRequest, precision: str) -> dict[str, Any]:
    """What the engine is built with: the optimisation profile over batch sizes, the precision flags, memory."""
    batch, size = request.profile.tensorrt.batch, request.info.img_size
    shape = [3, size, size]
    return {"precision": precision, "flags": {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision],
            "shapes": {"min": [batch.min, *shape], "opt": [batch.opt, *shape], "max": [batch.max, *shape]},
            "workspace_mib": request.profile.tensorrt.workspace_mib}


def trtexec_command(onnx_path: Path, engine_path: Path, settings: dict[str, Any]) -> list[str]:
    """The equivalent `trtexec` command line, used when the TensorRT Python package is absent but trtexec is not."""
    shapes = {key: "x".join(map(str, dims)) for key, dims in settings["shapes"].items()}
    command = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
               f"--minShapes={INPUT_NAME}:{shapes['min']}", f"--optShapes={INPUT_NAME}:{shapes['opt']}",
               f"--maxShapes={INPUT_NAME}:{shapes['max']}", f"--memPoolSize=workspace:{settings['workspace_mib']}M"]
    return command + [f"--{flag.lower()}" for flag in settings["flags"]]


def build_engine(onnx_path: Path, engine_path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Parse the ONNX graph, build a serialized engine with an optimisation profile, write it atomically."""
    if importlib.util.find_spec("tensorrt") is None:
        command = trtexec_command(onnx_path, engine_path, settings)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise CheckFailed(f"trtexec could not build {engine_path} (exit {result.returncode}): "
                              f"{result.stdout[-600:]} {result.stderr[-600:]}")
        return {"builder": "trtexec", "command": " ".join(command)}
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # required before TensorRT 10, ignored after
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_mib"] << 20)
    for flag in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    shapes = settings["shapes"]
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"TensorRT {trt.__version__} could not build an engine from {onnx_path}; its log above "
                          "names the layer. Try --precision fp16, or exclude that op type from INT8.")
    atomic_write(engine_path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    return {"builder": "tensorrt-python"}


@register_backend
class TensorRtBackend(Backend):
    name = "tensorrt"
    format = "tensorrt"
    precisions = ("fp32", "fp16", "int8")

    def __init__(self, engine, torch_module):
        self.engine, self.torch = engine, torch_module
        self.context = engine.create_execution_context()
        self.output_name = next(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                                if engine.get_tensor_name(i) != INPUT_NAME)

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("tensorrt") is None and shutil.which("trtexec") is None:
            return "TensorRT is not installed here (neither its Python package nor trtexec)"
        if gpu_name() is None:
            return "there is no CUDA GPU here (TensorRT engines are built on the GPU that runs them)"
        return None

    @classmethod
    def export(cls, request: ExportRequest) -> list[dict[str, Any]]:
        """The Q/DQ graph for INT8 (on any machine), then one engine per precision (on the target GPU)."""
        out, records = request.out_dir, []
        sources = {"fp32": request.onnx_path, "fp16": request.onnx_path}
        if "int8" in request.precisions:
            qdq = out / QDQ_NAME / ONNX_FILE
            quantization = quantize_for_tensorrt(request, qdq)
            records.append(artifact_record(qdq, out, name=QDQ_NAME, backend="onnxruntime", file_format="onnx",
                                           precision="int8", quantization=quantization, engine_input=True))
            sources["int8"] = qdq
        reason = cls.unavailable()
        if reason:
            written = "the ONNX graph and its Q/DQ INT8 version" if "int8" in sources else "the ONNX graph"
            raise BackendUnavailable(f"No TensorRT engine was built: {reason}. Everything before the engine build "
                                     f"was written and verified ({written}). To finish, {INSTALL_HINT}.", records)
        for precision in (p for p in cls.precisions if p in request.precisions):
            engine = out / f"tensorrt-{precision}" / ENGINE_FILE
            settings = build_settings(request, precision)
            built = build_engine(sources[precision], engine, settings)
            records.append(artifact_record(engine, out, name=f"tensorrt-{precision}", backend=cls.name,
                                           file_format="tensorrt", precision=precision, tensorrt=tensorrt_version(),
                                           gpu=gpu_name(), build=settings,
                                           source=sources[precision].relative_to(out).as_posix(), **built))
        return records

    @classmethod
    def load(cls, path: Path, threads: int = 0) -> TensorRtBackend:
        reason = cls.unavailable()
        if reason or importlib.util.find_spec("tensorrt") is None:
            raise UserError(f"{path} is a TensorRT engine, but {reason or 'the TensorRT Python package is missing'}. "
                            "Run it on the machine that built it.")
        import tensorrt as trt
        import torch

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise UserError(f"{path} cannot be loaded by TensorRT {trt.__version__} on {gpu_name()}: engines only run "
                            "on the GPU model and TensorRT version that built them. Rebuild it here with "
                            "`kd2deploy export EXPORT_DIR --format tensorrt`.")
        return cls(engine, torch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        images = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        self.context.set_input_shape(INPUT_NAME, tuple(images.shape))
        logits = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32,
                             device="cuda")
        self.context.set_tensor_address(INPUT_NAME, images.data_ptr())
        self.context.set_tensor_address(self.output_name, logits.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise CheckFailed("TensorRT failed to run the engine (execute_async_v3 returned False).")
        stream.synchronize()
        return logits.cpu().numpy()
