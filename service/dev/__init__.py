"""Dev-only tooling: embedded PostgreSQL and broker, the supervisor behind `make run`. Never imported by the
four processes."""
