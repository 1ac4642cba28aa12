"""Shared state on Redis (REDIS_URL): the connection, the leader lease, the slots held across processes."""
