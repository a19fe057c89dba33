"""NumPy reference of every rounding rule, range estimator and integer op (imports only NumPy).

The PyTorch (``qpipe.pipeline``) and ONNX (``qpipe.export``) versions are tested against these.
"""
