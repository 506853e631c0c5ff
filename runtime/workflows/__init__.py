"""Workflows over the agents: evaluate a model, gather, examine, the whole SALAM experiment (one library call each)."""
