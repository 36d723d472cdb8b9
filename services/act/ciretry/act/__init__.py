"""ciretry act service."""
