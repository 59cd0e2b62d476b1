"""Records: the scorecard record, provenance and verify, run state for resume."""
