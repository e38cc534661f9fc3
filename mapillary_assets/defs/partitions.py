"""The two partitionings: tiles of the area of interest (discovery) and id chunks (everything per image).

Tile partitions are computed when the code location loads, from MAPILLARY_AOI and
MAPILLARY_PARTITION_ZOOM; chunk partitions are dynamic, added by the `image_chunks` asset as
discovery finds new images.
"""

from __future__ import annotations

import dagster as dg

from mapillary_assets.defs.settings import current_aoi, partition_zoom
from mapillary_assets.pipeline.aoi import partition_tiles, tile_key

CHUNK_PARTITIONS_NAME = "id_chunks"

tile_partitions = dg.StaticPartitionsDefinition(
    [tile_key(tile) for tile in partition_tiles(current_aoi(), partition_zoom())]
)

chunk_partitions = dg.DynamicPartitionsDefinition(name=CHUNK_PARTITIONS_NAME)
