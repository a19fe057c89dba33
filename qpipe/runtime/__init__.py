"""The onnxruntime stage: sessions and providers, accuracy / latency / parity, artifact checks."""
