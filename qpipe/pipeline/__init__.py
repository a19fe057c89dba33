"""The PyTorch stage: quantizers and observers, rounding, Q-modules, BN folding, calibration."""
