"""Triton kernels for MoE dispatch/combine and the gather-fused grouped GEMM, and their
launchers (installed as ``moebal.kernels``).

Imports only torch and triton. Launchers check shapes, allocate outputs and launch; the
autograd wiring lives in ``moebal.triton_ops`` next to the pure-torch twins.
"""
from .combine import combine_rows, combine_rows_backward, zero_padding_rows
from .dispatch import dispatch_rows, dispatch_rows_backward
from .gather_gemm import grouped_gemm, grouped_gemm_wgrad
from .plan import RoutingMetadata, routing_metadata

__all__ = [
    "RoutingMetadata",
    "routing_metadata",
    "dispatch_rows",
    "dispatch_rows_backward",
    "combine_rows",
    "combine_rows_backward",
    "zero_padding_rows",
    "grouped_gemm",
    "grouped_gemm_wgrad",
]
