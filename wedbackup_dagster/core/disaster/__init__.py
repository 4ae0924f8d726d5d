"""Disaster recovery, plain Python: `restore --all` (restore_all.py, its batches in batches.py), the runbook of
each disaster scenario (plans.py), the drills (drills.py) and the master-key recovery kit (kit.py). The
`restore_platform` and `dr_drill` jobs and `wedbackup restore --all` / `wedbackup dr …` are thin calls into
these names, gathered here so a caller writes `disaster.restore_all(…)`."""
from .drills import (DrillReport, drill, drill_catalogue_lost, drill_provider, drill_sample,  # noqa: F401
                     tier_outcomes)
from .kit import check_kit_key_file, key_fingerprint, kit_sheet  # noqa: F401
from .plans import SCENARIOS, RecoveryPlan, parse_scenario, recovery_plan  # noqa: F401
from .restore_all import (LOCATIONS, PartitionResult, PlatformReport, RestoreAllOptions,  # noqa: F401
                          all_recovery_points, copy_order, planned_partitions, restore_all, restore_partition)
