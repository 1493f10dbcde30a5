"""Trigger inversion: one batched engine, and the methods (Neural Cleanse, TABOR, Pixel, UAP, CW-L0) on it."""
