"""Export artifacts to deployment formats (ONNX) and run them there (ONNX Runtime)."""

from __future__ import annotations

from .onnx import (
    OnnxRunner,
    deploy_runtime,
    deployment_info,
    export_onnx,
    float_parts,
    integer_ops_in_session,
    optimized_op_counts,
    parity,
)

__all__ = ["OnnxRunner", "deploy_runtime", "deployment_info", "export_onnx", "float_parts",
           "integer_ops_in_session", "optimized_op_counts", "parity"]
