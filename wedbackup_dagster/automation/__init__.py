"""Automation: backups that run by themselves — the prioritized backup schedule, and sensors for wedding
discovery, change capture, provider health and run failures. Thin Dagster wiring over core.policy etc."""

# Filled in by the automation modules; definitions.py adds whatever is listed here.
schedules: list = []
sensors: list = []
jobs: list = []
