"""Dagster asset platform for Mapillary street-level imagery."""
