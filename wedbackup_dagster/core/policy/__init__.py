"""Backup policy: tiers, RPOs, retention rules and thresholds (backup_policy), and the rules every wedding's
backup must keep (rules)."""
