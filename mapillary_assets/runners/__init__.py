"""How the pipeline's runs execute, apart from what they compute (`mapillary_assets.defs`): the
instance they share, the local and cluster runners, the release of runs whose process died."""
