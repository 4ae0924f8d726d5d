"""The catalogue (PostgreSQL schema `wedbackup`): its store of backups, copies and wedding keys, per-partition
locks, its rebuild from storage, and the storage inventory reconciled against it."""
