"""README tells the truth: the two commands, and every configuration variable the code reads."""
from pathlib import Path

from wedbackup_dagster.core.config import VARIABLES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_two_commands_are_at_the_top():
    head = README[:1500]
    assert "make demo" in head and "make test" in head


def test_every_variable_is_in_the_configuration_table():
    missing = [name for name in VARIABLES if f"`{name}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci
