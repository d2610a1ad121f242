"""Calibration: text -> token windows -> per-layer second moments, streamed layer by layer."""
