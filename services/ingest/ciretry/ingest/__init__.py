"""ciretry ingest service."""
