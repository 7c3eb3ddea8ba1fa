"""Model sources: the demo network and (later) users' own models."""
