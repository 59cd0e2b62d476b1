"""Verdicts: metric ids and counts, per-sample outcomes, gates."""
