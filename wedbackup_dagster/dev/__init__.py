"""Local-development tools, not the engine: the local stack of PostgreSQL and provider stand-ins, the demo
database and the demo media."""
