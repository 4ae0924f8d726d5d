"""The media fixtures of the core tests, for the Dagster and command-line tests of media."""
from wedbackup_dagster_tests.core.media.conftest import TEST_SCALE, media_world  # noqa: F401
