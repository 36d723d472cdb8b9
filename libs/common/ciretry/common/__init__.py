"""Code shared by every ciretry service: event types, the event store, the bus, config, telemetry."""
