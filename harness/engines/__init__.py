"""Engines run units of work on devices: the local thread pool over devices (and, later, Ray)."""
