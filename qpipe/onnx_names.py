"""The names qpipe writes into ONNX files: custom domains, their versions, op names and opsets.

Every stage reads them from here, so a model written by one version of qpipe is read by the same names
everywhere (the PyTorch stage marks graphs with them, the ONNX stage emits them, the runtime checks them).
"""

from __future__ import annotations

QPIPE_DOMAIN = "ai.qpipe"    # qpipe's integer and adder ops, as ONNX functions (onnxscript)
QPIPE_VERSION = 1
MARK_DOMAIN = "qpipe.mark"   # markers in the artifact's float graph (graph.onnx); never in an exported model

# ai.qpipe ops that appear in exported graphs (the helper functions they call are listed in export/intops.py)
REQUANT = "Requant"
INT_ADD = "IntAdd"
INT_SOFTMAX = "IntSoftmax"
INT_GELU = "IntGELU"
INT_LAYERNORM = "IntLayerNorm"
APOT_PROJECT = "APoTProject"
ADDER2D = "Adder2d"
ADDER_INTEGER = "AdderInteger"
PUBLIC_OPS = (REQUANT, INT_ADD, INT_SOFTMAX, INT_GELU, INT_LAYERNORM, APOT_PROJECT, ADDER2D, ADDER_INTEGER)

# qpipe.mark ops in graph.onnx
MARK = "Mark"            # a quantized tensor (weight, bias or activation), replaced by DQ or Q/DQ on export
MARK_ADDER = "Adder"     # the weights of a quantized adder layer, expanded per filter group on export
MARK_INT_OP = "IntOp"    # where an integer op replaces a float one

# opsets
TORCHSCRIPT_OPSET = 20   # the TorchScript exporter's highest; the ONNX stage converts to its own opset
DEFAULT_OPSET = 21       # exported models (INT4 weights and 16-bit activations need 21)
FUNCTIONS_OPSET = 21     # the standard opset the ai.qpipe function bodies are written in
MIN_INT_OPSET = 18       # Reduce* with axes as an input, used by the function bodies
IR_VERSION = 10          # onnxruntime 1.2x/1.3x refuse the IR version that onnx.helper writes by default
