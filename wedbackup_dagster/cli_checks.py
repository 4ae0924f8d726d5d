"""`wedbackup verify …` and other checking commands (filled in by the checks work)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
