"""ciretry classify service."""
