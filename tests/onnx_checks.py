"""Checks on exported ONNX files that more than one test module makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from vitcompress.methods.quant.qmodules import QuantConv2d, QuantLinear


def assert_int8_initializers_are_ours(path: Path, model: nn.Module) -> list[np.ndarray]:
    """The ONNX file's int8 initializers are exactly our weights: Linear ones transposed to (in, out)
    for MatMul, conv ones as they are. Returns them."""
    int8 = [a for a in map(numpy_helper.to_array, onnx.load(str(path)).graph.initializer) if a.dtype == np.int8]
    ours = [m.weight_int8.t().numpy().tobytes() for m in model.modules() if isinstance(m, QuantLinear)]
    ours += [m.weight_int8.numpy().tobytes() for m in model.modules() if isinstance(m, QuantConv2d)]
    assert sorted(a.tobytes() for a in int8) == sorted(ours)
    return int8
