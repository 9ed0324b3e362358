"""Producers: the outbox relay, the TTL producer and the client-side publisher the CLI uses."""
