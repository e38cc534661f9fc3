"""Scaled-out mode: PostgreSQL instance, runs on Celery workers, one Redis rate budget (see README)."""
