"""`wedbackup catalogue …` and other automation commands (filled in by the automation work)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    return None
