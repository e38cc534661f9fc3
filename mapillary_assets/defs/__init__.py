"""The Dagster layer: thin assets over `mapillary_assets.pipeline`, partitions, resources, checks, automation."""

import warnings

import dagster as dg

# `backfill_policy` is marked beta; we rely on it knowingly (ranged runs), so its warning is noise in run logs.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
