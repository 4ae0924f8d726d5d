"""Wedding media (photos, videos, documents, vendor portfolios): deduplicated, encrypted per wedding,
copied 3-2-1 and restorable by wedding. Plain Python, no Dagster: source listing, chunking, packs,
snapshots, the store (vault, providers, catalogue), backup, restore and verification."""
