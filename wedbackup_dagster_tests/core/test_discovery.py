"""Grouping scattered weddings into contiguous partition ranges (one Dagster run each)."""
import pytest

from wedbackup_dagster.core.discovery import contiguous_ranges


def test_ranges_follow_insertion_order():
    ordered = ["platform", "1", "2", "3", "10", "11", "4"]
    assert contiguous_ranges(["1", "2", "3", "4"], ordered) == [("1", "3"), ("4", "4")]
    assert contiguous_ranges(ordered, ordered) == [("platform", "4")]
    assert contiguous_ranges(["11", "platform"], ordered) == [("platform", "platform"), ("11", "11")]


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="99"):
        contiguous_ranges(["1", "99"], ["1", "2"])
