"""Discovery: which images lie in the area of interest, by one of three routes.

- `tiles.discover_partition` (the tile route, used by the partitioned asset): one coarse `sequence`-layer
  tile of a partition says which z14 tiles hold imagery; only those are fetched (`tile_cache`).
- `search.discover_by_bbox_search`: recursive `images?bbox=` search of the Graph API.
- `sequences.discover_by_sequences`: the images of given sequence ids.

Every route returns a frame of `results.DISCOVERY_COLUMNS` and a `results.DiscoveryStats`.
"""
