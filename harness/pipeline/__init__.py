"""The pipeline: a run (and a hardening run) as ordered stages over an explicit run context.

stages.py holds the order of a run (resolve, load, provenance, suite, defended, probed, judge,
write), one module per stage, over context.RunContext; resume.py is the saved work a run keeps as it
goes. harden.py is `harness harden` in the same shape (resolve, load, train, write) over a
HardenContext, with its checkpoints in checkpoint.py.
"""
