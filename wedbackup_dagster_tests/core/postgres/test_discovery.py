"""Grouping scattered weddings into contiguous partition ranges (one Dagster run each)."""
import pytest

from wedbackup_dagster.core.postgres.discovery import contiguous_ranges


def test_ranges_follow_insertion_order():
    ordered = ["platform", "1", "2", "3", "10", "11", "4"]
    assert contiguous_ranges(["1", "2", "3", "4"], ordered) == [("1", "3"), ("4", "4")]
    assert contiguous_ranges(ordered, ordered) == [("platform", "4")]
    assert contiguous_ranges(["11", "platform"], ordered) == [("platform", "platform"), ("11", "11")]


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="99"):
        contiguous_ranges(["1", "99"], ["1", "2"])


def test_wedding_ids_are_in_numeric_order(make_database):
    import psycopg

    from wedbackup_dagster.core.postgres.discovery import wedding_ids

    dsn = make_database()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY)")
        conn.execute("INSERT INTO weddings SELECT unnest(ARRAY[10, 2, 100, 1])")
    assert wedding_ids(dsn) == ["1", "2", "10", "100"]
