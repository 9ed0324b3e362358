"""Everything that knows PostgreSQL: settings, domain rules, handlers, SQL, read views, HTTP API."""
