"""Local-development tools, not the engine: the local stack of PostgreSQL and provider stand-ins, and the demo
database."""
