"""The ONNX stage: reads the frozen record of an artifact, writes ONNX graphs. Imports nothing from pipeline."""

from .qdq import export

__all__ = ["export"]
