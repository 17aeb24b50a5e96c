"""The student as an FP32 ONNX graph: the file every backend builds from (ONNX Runtime runs it, OpenVINO converts
it, TensorRT parses it)."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from ..backends.base import INPUT_NAME, OUTPUT_NAME
from ..checkpoint import atomic_write
from ..data.sources import CHANNELS, DataInfo
from ..errors import UserError
from .profiles import OPSET


@contextlib.contextmanager
def _exporter_prints_hidden() -> Iterator[None]:
    """Swallow the exporter's progress prints and warnings; its exceptions still propagate."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def export_onnx(model: nn.Module, info: DataInfo, path: Path, console: Console, opset: int = OPSET,
                dynamic_size: bool = False, simplify: bool = False) -> dict[str, Any]:
    """Write `model` as a single-file ONNX graph with a dynamic batch (and optionally dynamic height and width);
    returns how it was made.

    The dynamo exporter comes first; a model it cannot capture falls back to the TorchScript exporter."""
    example = (torch.zeros(2, CHANNELS, info.img_size, info.img_size),)  # batch 2: a batch of 1 could be specialised
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    dims = {0: torch.export.Dim("batch", min=1)}
    axes = {0: "batch"}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=8), 3: torch.export.Dim("width", min=8)})
        axes.update({2: "height", 3: "width"})

    def dynamo(tmp: Path) -> None:
        torch.onnx.export(model, example, tmp, dynamo=True, external_data=False, dynamic_shapes=(dims,), **names)

    def torchscript(tmp: Path) -> None:
        torch.onnx.export(model, example, tmp, dynamo=False, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
                          **names)

    try:
        with _exporter_prints_hidden():
            atomic_write(path, dynamo)
        exporter = "dynamo"
    except Exception as exc:  # the dynamo exporter raises many types; the fallback reports its own errors
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        if dynamic_size:
            raise UserError(f"The student cannot be exported with a dynamic input size ({type(exc).__name__}: "
                            f"{first_line}). ViTs have a fixed position table; export without --dynamic-size (or "
                            "set input.dynamic_size: false in the target profile).") from None
        console.print(f"[yellow]The dynamo ONNX exporter failed ({type(exc).__name__}: {escape(first_line)}); "
                      "falling back to the TorchScript exporter.[/yellow]")
        with _exporter_prints_hidden():
            atomic_write(path, torchscript)
        exporter = "torchscript"
    details: dict[str, Any] = {"exporter": exporter, "opset": opset, "dynamic_batch": True,
                               "dynamic_size": dynamic_size, "simplified": None}
    if simplify:
        details["simplified"] = simplify_onnx(path, console)
    onnx.checker.check_model(str(path), full_check=True)
    return details


def simplify_onnx(path: Path, console: Console) -> str | None:
    """Rewrite `path` with onnxslim (constant folding, dead nodes, fusions); returns the tool used, None when it
    failed (the exported graph is kept: the simplification is an optimisation, not a requirement)."""
    import onnxslim

    try:
        with _exporter_prints_hidden():
            slim = onnxslim.slim(onnx.load(str(path)))
        atomic_write(path, lambda tmp: onnx.save(slim, str(tmp)))
    except Exception as exc:  # onnxslim raises whatever its passes raise
        console.print(f"[yellow]onnxslim could not simplify the graph ({type(exc).__name__}: "
                      f"{escape(str(exc).splitlines()[0][:200]) if str(exc) else ''}); keeping the exported "
                      "graph.[/yellow]")
        return None
    return f"onnxslim {onnxslim.__version__}"

