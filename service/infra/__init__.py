"""Infrastructure: settings, PostgreSQL, Kafka clients, logs, metrics, process runtime, error classes."""
