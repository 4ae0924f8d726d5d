"""The change feed (issue 18): PostgreSQL logical decoding drained into per-wedding change segments, so a
wedding can be restored to any second after one of its snapshots. docs/CHANGEFEED.md describes it.

slot — the source check, publication and slot; decode — the pgoutput message decoder; routing — each
change to its wedding; segments — a wedding's changes sealed like an archive; store — the catalogue's
change-feed tables; drain — peek, persist, then advance; replay — segments applied on a restored snapshot."""
