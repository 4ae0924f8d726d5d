"""Disaster recovery in Dagster: `restore_platform` (the whole platform into an empty database, resumable).
Thin wiring over core.disaster.

definitions.py adds the objects listed here (named *_defs so they never clash with submodule names)."""
from .restore_platform_job import restore_platform

job_defs = [restore_platform]
