"""The ONNX stage: reads the frozen record of an artifact, writes ONNX graphs. Imports nothing from pipeline.

``qpipe.export`` is both this package and the API function ``qpipe.export(artifact, format=...)``: importing
the package replaces the attribute on ``qpipe``, so the module itself is made callable.
"""

import sys
import types

from .qdq import export


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["export"]
