"""Test support: stacks of the real processes, batch feeders, a PostgreSQL fault proxy."""
