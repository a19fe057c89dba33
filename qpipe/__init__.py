"""qpipe: post-training quantization of PyTorch models to QDQ / integer ONNX, checked in onnxruntime."""

__version__ = "0.1.0"


def calibrate(*args, **kwargs):
    from qpipe.pipeline.calibrate import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


def export(*args, **kwargs):
    from qpipe.export import export as _export

    return _export(*args, **kwargs)


def evaluate(*args, **kwargs):
    from qpipe.runtime.evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def check(*args, **kwargs):
    from qpipe.runtime.check import check as _check

    return _check(*args, **kwargs)


def run(*args, **kwargs):
    """calibrate -> export -> evaluate -> check in one call (``qpipe.flow.run``); returns a ``RunResult``."""
    from qpipe.flow import run as _run

    return _run(*args, **kwargs)


def train_qat(*args, **kwargs):
    from qpipe.pipeline.qat import train_qat as _train_qat

    return _train_qat(*args, **kwargs)


__all__ = ["__version__", "calibrate", "export", "evaluate", "check", "run", "train_qat"]
