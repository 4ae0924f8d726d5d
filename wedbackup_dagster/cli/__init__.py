"""The `wedbackup` command line: `app.py` builds the parser from one module per command group, named as restic
names its commands (`cmd_<group>.py`: dev, backup, restore, checks, catalogue, health, governance, keys,
disaster); `common.py` holds what they share."""
from .app import main  # noqa: F401  (console scripts installed before the package existed call cli:main)
