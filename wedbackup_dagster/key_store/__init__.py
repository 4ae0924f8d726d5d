"""The key store in Dagster: the encrypted key-store backup (a job, an hourly schedule, and a sensor after every
successful backup run that made a new wedding key) and master key rotation. Thin wiring over
core.keys.backup and core.keys.rotation; definitions.py adds the objects listed here."""
from .jobs import key_store_backup, key_store_backup_after_backups, key_store_backup_schedule, rotate_keys

job_defs = [key_store_backup, rotate_keys]
schedule_defs = [key_store_backup_schedule]
sensor_defs = [key_store_backup_after_backups]
