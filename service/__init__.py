"""The application. Where each path starts:

- write path: `write/batch.py` (`BatchProcessor.process`), called by `consumers/worker.py` for each polled batch;
  the rules it applies are the pure `domain.py` and `bucket.py`; handlers in `write/*_handlers.py`.
- read path: `read/api.py` (`create_app`), SQL in `read/views.py`.
- infrastructure: `infra/` (settings, db and migrations, Kafka clients, logs, metrics, runtime, errors).
- command line: `cli/main.py`; dev tooling (`make run`, embedded servers): `dev/`.
"""
