"""Benchmarks: wedbackup measured side by side with what a user would otherwise run, on one database."""
