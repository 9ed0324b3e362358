"""The SQL of the infrastructure: the migrator's bookkeeping. The schema itself lives in migrations/."""

LOCK = "SELECT pg_advisory_lock($1)"
UNLOCK = "SELECT pg_advisory_unlock($1)"
CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())
"""
APPLIED_MIGRATIONS = "SELECT name FROM schema_migrations"
RECORD_MIGRATION = "INSERT INTO schema_migrations (name) VALUES ($1)"
DATABASE_EXISTS = "SELECT 1 FROM pg_database WHERE datname = $1"
CREATE_DATABASE = 'CREATE DATABASE "{name}"'  # a name cannot be a $n parameter
# Every answer the API processes keep in memory is dropped (service/read/answers.py; the channel of migration 012).
NOTIFY_EVERY_ANSWER = "SELECT pg_notify('segmentation_users', '*')"
