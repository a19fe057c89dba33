"""onnxruntime sessions: CUDA only where it can load, CPU otherwise, and always say which provider ran.

Two kinds: a deterministic *validation* session (all graph optimisations off, so the QDQ graph runs as
written) for accuracy and parity, and a fully optimised *fast* session (fused integer kernels) for latency.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import onnxruntime as ort

from qpipe.errors import QpipeError


@functools.cache
def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider and a CUDA driver loads (a GPU is present)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def providers_for(device: str) -> list[str]:
    if device == "cuda":
        if not cuda_usable():
            raise QpipeError("--device cuda: no usable CUDA provider here (no GPU or no CUDA driver); use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device in ("cpu", "auto"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "auto" and cuda_usable() \
            else ["CPUExecutionProvider"]
    raise QpipeError(f"unknown device {device!r}; use cpu, cuda or auto")


def make_session(path: str | Path, device: str = "cpu", optimized: bool = False, threads: int | None = None,
                 optimized_model_path: str | Path | None = None,
                 config: dict[str, str] | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # exact INT4 MatMul if onnxruntime rewrites DequantizeLinear->MatMul into MatMulNBits
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for key, value in (config or {}).items():   # further session config entries (tests: switch a fusion off)
        so.add_session_config_entry(key, value)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    if not Path(path).is_file():
        raise QpipeError(f"ONNX file {path} does not exist")
    try:
        return ort.InferenceSession(str(path), so, providers=providers_for(device))
    except QpipeError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QpipeError(f"onnxruntime could not load {path}: {first[:300]}") from e


def provider(sess: ort.InferenceSession) -> str:
    return sess.get_providers()[0]


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# x86 flags whose int8 dot product (VPDPBUSD, AMX TDPBUSD) sums u8 x s8 products in int32: onnxruntime's
# u8 x s8 kernels are exact there. Without them (AVX2, AVX-512 without VNNI) VPMADDUBSW adds pairs of products
# in int16 with saturation, so full-range int8 weights against uint8 activations can saturate.
EXACT_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "flags":
            return frozenset(val.split())
    return frozenset()


def u8s8_exact() -> bool:
    """True when this CPU runs onnxruntime's u8 x s8 integer kernels without int16 saturation (VNNI or AMX)."""
    return any(f in cpu_flags() for f in EXACT_INT8_DOT_FLAGS)
