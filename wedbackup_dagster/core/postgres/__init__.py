"""Everything that talks to a PostgreSQL database being backed up or restored into: tenancy, the snapshot
session, loading a snapshot, restoring a wedding, scratch databases, verification, database identity,
discovery."""
