"""Governance: GDPR erasure of a wedding (`erase_wedding`) and retention (`retention_sweep`, daily).
Thin Dagster wiring over core.governance.erasure and core.governance.retention.

definitions.py adds the objects listed here (named *_defs so they never clash with submodule names)."""
from .erasure_job import erase_wedding
from .retention_job import retention_sweep, retention_sweep_schedule

job_defs = [erase_wedding, retention_sweep]
schedule_defs = [retention_sweep_schedule]
