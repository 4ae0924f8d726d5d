"""wedbackup: per-wedding backup orchestration on Dagster.

`core` is the plain-Python engine (no Dagster imports); the rest of the package is thin Dagster wiring.
"""
