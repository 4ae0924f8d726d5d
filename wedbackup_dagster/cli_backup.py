"""`wedbackup backup` and `wedbackup restore`: the round trip through Dagster, from the command line."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # filled in by the pipeline
    return None
