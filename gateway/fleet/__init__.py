"""Who is registered and healthy: the server record, its store, health checks, monitor readings, models."""
