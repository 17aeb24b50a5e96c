"""Deployment target profiles: the YAML files in kd2deploy/deploy/profiles/ (package data), validated by pydantic.

A profile says which formats and precisions suit a device, how many threads it runs, which INT8 preset its
runtime's kernels want and which input shapes to build for. `kd2deploy export --target NAME` reads one; without
--target the build machine's own CPU profile is used (`host_profile`).
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UserError, validation_problems
from ..machine import cpu_flags

Format = Literal["onnx", "openvino", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8"]
CalibMethod = Literal["minmax", "entropy", "percentile"]
# optimum's AutoQuantizationConfig presets, plus `portable` (kd2deploy's own, for machines without optimum)
OrtPreset = Literal["auto", "avx2", "avx512", "avx512_vnni", "arm64", "tensorrt", "portable"]
FORMATS, PRECISIONS, CALIB_METHODS = get_args(Format), get_args(Precision), get_args(CalibMethod)
# 18 is the opset torch's dynamo exporter (torchlib) is written in: higher opsets need a version-conversion pass
# after export, and 18 already runs on every runtime kd2deploy targets (ONNX Runtime >= 1.14, OpenVINO, TensorRT 8.6+).
OPSET = 18


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSettings(_Section):
    dynamic_batch: bool = True
    dynamic_size: bool = Field(False, description="dynamic height and width (CNNs; ViTs have fixed position tables)")


class OnnxSettings(_Section):
    opset: int = Field(OPSET, ge=13, le=OPSET, description="18 is what torch's dynamo exporter writes natively")
    simplify: bool = Field(True, description="run onnxslim (constant folding, dead-node removal, fusions)")


class OrtSettings(_Section):
    int8_preset: OrtPreset = "auto"
    calib_method: CalibMethod = "minmax"
    exclude_op_types: list[str] = Field(default_factory=list, description="ONNX op types left in float")
    exclude_nodes: list[str] = Field(default_factory=list, description="ONNX node names left in float")


class OpenVinoSettings(_Section):
    device: str = "CPU"
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"


class TrtBatch(_Section):
    min: int = Field(1, ge=1)
    opt: int = Field(1, ge=1)
    max: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> TrtBatch:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class TensorRtSettings(_Section):
    batch: TrtBatch = Field(default_factory=TrtBatch)
    workspace_mib: int = Field(1024, ge=64)


class DeviceProfile(_Section):
    name: str
    description: str = ""
    device: Literal["cpu", "cuda"] = "cpu"
    formats: list[Format] = Field(default_factory=lambda: ["onnx"], min_length=1)
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32"], min_length=1)
    threads: int = Field(0, ge=0, description="0: the runtime's default (every core)")
    input: InputSettings = Field(default_factory=InputSettings)
    onnx: OnnxSettings = Field(default_factory=OnnxSettings)
    onnxruntime: OrtSettings = Field(default_factory=OrtSettings)
    openvino: OpenVinoSettings = Field(default_factory=OpenVinoSettings)
    tensorrt: TensorRtSettings = Field(default_factory=TensorRtSettings)
    source: str | None = Field(None, description="the file the profile was read from (filled in when loaded)")


def profiles_dir() -> Path:
    """The bundled profiles: package data, in wheel and editable installs alike."""
    return Path(__file__).resolve().parent / "profiles"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A bundled profile by name (profiles/NAME.yaml) or a profile file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = profiles_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"Unknown export target `{name_or_path}`: it is neither a profile file nor one of the "
                        f"bundled profiles ({', '.join(list_profiles())}) in {profiles_dir()}. Give one of those names "
                        "or the path of a profile YAML.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"Export target profile {path} is not valid YAML ({str(exc).splitlines()[0]}). Fix the "
                        "file; the bundled kd2deploy/deploy/profiles/laptop-x86.yaml is a complete example.") from None
    try:
        return DeviceProfile.model_validate({**(raw or {}), "source": str(path)})
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise UserError(f"Export target profile {path}: {problems}. Fix the file; the bundled "
                        "kd2deploy/deploy/profiles/laptop-x86.yaml lists every field.") from None


def host_profile() -> DeviceProfile:
    """The profile for the machine kd2deploy runs on: arm64-cpu on ARM, laptop-x86 otherwise."""
    is_arm = platform.machine().lower() in ("arm64", "aarch64")
    return load_profile("arm64-cpu" if is_arm else "laptop-x86")


def resolve_ort_preset(preset: str) -> str:
    """`auto` becomes the optimum preset that matches the build machine's CPU: the INT8 kernels it will run."""
    if preset != "auto":
        return preset
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags = set(cpu_flags())
    if flags & {"avx512_vnni", "amx_int8"}:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"
