"""TensorRT: FP32/FP16 engines from the ONNX graph and INT8 engines from an explicitly quantized (Q/DQ) ONNX graph;
runs .engine files on the GPU with TensorRT's Python API and cuda-python (no torch).

Engines are specific to the GPU and TensorRT version that built them, so they are built on the target (a Jetson,
an RTX box): `kd2deploy export EXPORT_DIR --format tensorrt` there reads the exported ONNX and manifest. INT8 uses
explicit quantization, since TensorRT deprecated its implicit calibrators: the Q/DQ graph comes from NVIDIA Model
Optimizer when installed, otherwise from ONNX Runtime's quantizer with optimum's `tensorrt` preset (symmetric INT8
activations and weights, per-channel). That graph is built and verified on any machine; only the engine build
needs TensorRT and a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write
from ..errors import CheckFailed, UserError
from ..machine import gpu_info
from .base import (
    INPUT_NAME,
    Backend,
    BackendUnavailable,
    ExportRequest,
    artifact_record,
    register_backend,
    timed_runs,
)
from .ort import ONNX_FILE, quantize_qdq

ENGINE_FILE = "model.engine"
QDQ_NAME = "onnx-int8-tensorrt"  # the Q/DQ graph an INT8 engine is built from, itself runnable by ONNX Runtime
INSTALL_HINT = ("install TensorRT on the target (JetPack ships it on Jetson; `pip install tensorrt` on an RTX "
                "machine) and build there with `kd2deploy export EXPORT_DIR --format tensorrt --target NAME`")


def gpu_name() -> str | None:
    info = gpu_info()
    return info["name"] if info else None


@functools.cache
def cuda_runtime() -> Any:
    """cuda-python's runtime API module (cuda.bindings.runtime since cuda-python 12.6, cuda.cudart before), or None
    when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            return None
    return runtime


def _failed(error: Any) -> bool:
    return getattr(error, "value", error) != 0  # cudaError_t is an enum; cudaSuccess is 0


def _checked(result: tuple[Any, ...], call: str) -> Any:
    """What a cuda-python call returned after its leading cudaError_t (every call returns such a tuple): raise on
    an error, else the one value (or tuple of values, or None)."""
    error, *values = result
    if _failed(error):
        raise CheckFailed(f"CUDA {call} failed: {getattr(error, 'name', error)}.")
    return values[0] if len(values) == 1 else (tuple(values) or None)


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
    """Runs a serialized engine with TensorRT's Python API and cuda-python (no torch): one execution context, one
    CUDA stream, and device buffers for the input and output sized for the largest batch seen so far."""

    name = "tensorrt"
    format, suffix = "tensorrt", ".engine"
    precisions = ("fp32", "fp16", "int8")
    extra, packages, marker = "tensorrt", ("tensorrt", "cuda-python"), "*"
    export_needs_runtime = False  # the INT8 Q/DQ graph is built and verified anywhere; only engines need TensorRT
    timing_method = ("CUDA events around one enqueue of a resident input (a CUDA graph replay when the engine can be "
                     "captured), no host copies: trtexec's GPU compute time")

    def __init__(self, engine: Any, cudart: Any, path: Path | None = None, plan_bytes: int = 0):
        import tensorrt as trt

        self.cudart, self.path = cudart, path
        self.plan_bytes = plan_bytes  # the serialized engine's size: the weights deserialization put on the GPU
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self._shape: tuple[int, ...] | None = None
        self.stream = None
        self.used_cuda_graph: bool | None = None  # set by time_batch
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise CheckFailed(f"TensorRT could not create an execution context for {path or 'the engine'} (its log "
                              "above says why; usually the GPU is out of memory).")
        self.output_name = next(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                                if engine.get_tensor_name(i) != INPUT_NAME)
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(INPUT_NAME)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        # a stream of our own: graph capture cannot use the legacy default stream
        self.stream = _checked(cudart.cudaStreamCreate(), "cudaStreamCreate")

    @classmethod
    def build_unavailable(cls) -> str | None:
        """Why no engine can be built here: building needs TensorRT's Python package or trtexec, and the GPU."""
        if importlib.util.find_spec("tensorrt") is None and shutil.which("trtexec") is None:
            return "TensorRT is not installed here (neither its Python package nor trtexec)"
        if gpu_name() is None:
            return "there is no CUDA GPU here (TensorRT engines are built on the GPU that runs them)"
        return None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why engines cannot run here: running also needs the TensorRT Python package and cuda-python."""
        reason = cls.build_unavailable()
        if reason:
            return reason
        if importlib.util.find_spec("tensorrt") is None:
            return ("the TensorRT Python package is not installed (trtexec can build engines but kd2deploy runs them "
                    "through the Python API: `pip install tensorrt`, or JetPack's python3-libnvinfer on a Jetson)")
        if cuda_runtime() is None:
            return "cuda-python is not installed (pip install cuda-python, the major version of your CUDA)"
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
                                           precision="int8", quantization=quantization, intermediate=True))
            sources["int8"] = qdq
        reason = cls.build_unavailable()
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
        if reason:
            raise UserError(f"{path} is a TensorRT engine, but {reason}. Engines run only on the machine (GPU "
                            "model and TensorRT version) that built them.")
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        plan = Path(path).read_bytes()
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(f"{path} cannot be loaded by TensorRT {trt.__version__} on {gpu_name()}: engines only run "
                            "on the GPU model and TensorRT version that built them. Rebuild it here with "
                            "`kd2deploy export EXPORT_DIR --format tensorrt`.")
        return cls(engine, cuda_runtime(), Path(path), len(plan))

    def _reserve(self, name: str, nbytes: int) -> int:
        """The device buffer for a tensor, reallocated only when a batch needs more than it has."""
        pointer, size = self._buffers.get(name, (0, 0))
        if nbytes > size:
            if pointer:  # every run ends with a stream sync, so nothing still uses it
                _checked(self.cudart.cudaFree(pointer), "cudaFree")
                del self._buffers[name]
            pointer = int(_checked(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._buffers[name] = (pointer, nbytes)
        self.context.set_tensor_address(name, pointer)
        return pointer

    def _bind(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Set the input shape and buffers for `batch`: the host input, an empty host output, and their device
        pointers."""
        if self.context is None:
            raise CheckFailed("This TensorRT runner was closed.")
        images = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if images.shape != self._shape:
            if not self.context.set_input_shape(INPUT_NAME, images.shape):
                low, _, high = (tuple(dims) for dims in self.engine.get_tensor_profile_shape(INPUT_NAME, 0))
                raise UserError(f"A batch of shape {images.shape} is outside the optimisation profile of "
                                f"{self.path or 'this engine'} ({low} to {high}). Use a batch in that range, or "
                                "rebuild the engine with a target whose tensorrt.batch covers it.")
            self._shape = images.shape
        output = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), self.output_dtype)
        return images, output, self._reserve(INPUT_NAME, images.nbytes), self._reserve(self.output_name, output.nbytes)

    def _copy(self, destination: int, source: int, nbytes: int, kind: str) -> None:
        cudart = self.cudart
        _checked(cudart.cudaMemcpyAsync(destination, source, nbytes, getattr(cudart.cudaMemcpyKind, kind),
                                        self.stream), "cudaMemcpyAsync")

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise CheckFailed("TensorRT failed to run the engine (execute_async_v3 returned False; its log above "
                              "says why).")

    def _sync(self) -> None:
        _checked(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def run(self, batch: np.ndarray) -> np.ndarray:
        images, output, images_ptr, output_ptr = self._bind(batch)
        self._copy(images_ptr, images.ctypes.data, images.nbytes, "cudaMemcpyHostToDevice")
        self._enqueue()
        self._copy(output.ctypes.data, output_ptr, output.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()  # also keeps `images` alive until its copy is done
        return output.astype(np.float32, copy=False)

    def _capture_graph(self) -> Any:
        """An instantiated CUDA graph of one enqueue, or None when this engine cannot be captured (TensorRT
        developer guide, "CUDA Graphs": enqueue once after a shape change before capturing, which the caller
        did; some engines, e.g. with data-dependent shapes or loops, are not capturable)."""
        cudart = self.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        if _failed(cudart.cudaStreamBeginCapture(self.stream, mode)[0]):
            cudart.cudaGetLastError()
            return None
        try:
            enqueued = self.context.execute_async_v3(int(self.stream))
        finally:  # always leave capture mode, or the stream stays unusable
            error, graph = cudart.cudaStreamEndCapture(self.stream)
        if _failed(error) or not enqueued:
            if not _failed(error) and graph is not None:
                cudart.cudaGraphDestroy(graph)
            cudart.cudaGetLastError()  # clear the failed capture's error so later calls do not report it
            return None
        # WithFlags(graph, 0): the same signature in every cuda-python (cudaGraphInstantiate's changed in 12.0)
        error, graph_exec = cudart.cudaGraphInstantiateWithFlags(graph, 0)
        cudart.cudaGraphDestroy(graph)  # the executable graph does not need it
        if _failed(error):
            cudart.cudaGetLastError()
            return None
        return graph_exec

    def time_batch(self, batch: np.ndarray, iters: int, warmup: int, duration: float | None = None) -> list[float]:
        """GPU time of one inference of a resident input, like trtexec's GPU compute time: the batch is copied to
        the device once; each run is a CUDA graph replay (or, if the engine cannot be captured, one
        execute_async_v3) between two CUDA events on the stream. `self.used_cuda_graph` says which."""
        cudart = self.cudart
        images, _, images_ptr, _ = self._bind(batch)
        self._copy(images_ptr, images.ctypes.data, images.nbytes, "cudaMemcpyHostToDevice")
        for _ in range(max(1, warmup)):  # at least one: TensorRT must enqueue once after a shape change
            self._enqueue()
        self._sync()
        graph_exec = self._capture_graph()
        self.used_cuda_graph = graph_exec is not None
        events: list[Any] = []
        try:
            if graph_exec is not None:
                def launch() -> None:
                    _checked(cudart.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

                launch()  # the first launch uploads the graph: keep it out of the timings
            else:
                launch = self._enqueue
            self._sync()
            start = _checked(cudart.cudaEventCreate(), "cudaEventCreate")
            events.append(start)
            end = _checked(cudart.cudaEventCreate(), "cudaEventCreate")
            events.append(end)

            def cuda_events() -> float:
                _checked(cudart.cudaEventRecord(start, self.stream), "cudaEventRecord")
                launch()
                _checked(cudart.cudaEventRecord(end, self.stream), "cudaEventRecord")
                _checked(cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
                return _checked(cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime") / 1e3  # ms

            return timed_runs(cuda_events, iters, duration)
        finally:  # unchecked: cleanup must not hide the error that brought us here
            for event in events:
                cudart.cudaEventDestroy(event)
            if graph_exec is not None:
                cudart.cudaGraphExecDestroy(graph_exec)

    def device_memory_bytes(self) -> int | None:
        """TensorRT's own accounting, not a cudaMemGetInfo delta (on a Jetson the GPU shares memory with the CPU,
        so free-memory deltas count host allocations too): the serialized engine's size (the weights it holds
        on the device), the execution context's activation memory (device_memory_size_v2, device_memory_size
        before TensorRT 10.1) and the input and output buffers, sized for the largest batch run so far."""
        engine = self.engine
        context_bytes = getattr(engine, "device_memory_size_v2", None)
        if context_bytes is None:
            context_bytes = engine.device_memory_size
        return int(self.plan_bytes + context_bytes + sum(size for _, size in self._buffers.values()))

    def close(self) -> None:
        """Free the device buffers and the stream; safe to call twice and from __del__. Best effort, so the calls
        are unchecked: a sticky CUDA error must not stop the rest from being freed."""
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        stream, self.stream = getattr(self, "stream", None), None
        if stream is not None:
            cudart.cudaStreamSynchronize(stream)
        self.context = None  # before its buffers go: TensorRT frees the context's own memory here
        for pointer, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(pointer)
        self._buffers = {}
        if stream is not None:
            cudart.cudaStreamDestroy(stream)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down cuda-python already
            pass
