"""Measurement: time, memory and FLOPs, one small module each, with CPU and CUDA paths."""
