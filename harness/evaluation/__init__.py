"""Evaluation: the cascade over still-robust points, validity checks, defended variants, probes; records out."""
