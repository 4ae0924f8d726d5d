"""Development tools: the local stack and demo data (not part of the engine)."""
