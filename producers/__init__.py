"""Producers: the outbox relay, the TTL producer and the client library (`producers.client`) the CLI uses."""
