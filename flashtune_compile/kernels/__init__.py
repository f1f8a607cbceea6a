"""Kernels and the runners that offer them to the tuner. Kernels know nothing of FX or models."""
