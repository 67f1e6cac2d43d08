"""Evaluations that measure the library on data with known ground truth."""
