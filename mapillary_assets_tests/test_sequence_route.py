"""The sequence route through Dagster: MAPILLARY_SEQUENCE_IDS alone yields a GeoPackage of exactly those
sequences' images inside the area, with no tile discovery at all."""

from __future__ import annotations

import pytest

from mapillary_assets.defs.area import current_aoi
from mapillary_assets.defs.partitions import CHUNK_PARTITIONS_NAME
from mapillary_assets.defs.resources import ConfigError, PipelineSettings
from mapillary_assets.emulator import World
from mapillary_assets_tests.support.emulated_runs import pipeline_run
from mapillary_assets_tests.support.world import TEST_SCALE

pytestmark = pytest.mark.slow


def test_configured_sequences_alone_reach_the_geopackage(tmp_path):
    world = World(seed=7, scale=TEST_SCALE)
    records = world.images_in_polygon(current_aoi().geometry)
    sequences = sorted({r.sequence_id for r in records})[::10][:8]
    truth = {r.id for r in records if r.sequence_id in sequences}
    with pipeline_run(tmp_path, world=world, sequence_ids=", ".join(sequences)) as run:

        def execute(job: str, partition_key: str | None = None) -> None:
            result = run.defs.resolve_job_def(job).execute_in_process(
                instance=run.instance, partition_key=partition_key
            )
            assert result.success, job

        execute("assign_chunks_job")
        for chunk in sorted(run.instance.get_dynamic_partitions(CHUNK_PARTITIONS_NAME)):
            execute("process_chunks_job", chunk)
        execute("publish_job")
        assert set(run.images()["image_id"]) == truth and len(truth) > 20
        assert run.server.stats().get("tile", 0) == 0, "the sequence route fetches no tile"


def test_invalid_sequence_ids_are_named_with_the_fix(tmp_path):
    with pytest.raises(
        ConfigError, match=r"MAPILLARY_SEQUENCE_IDS holds 1 invalid sequence id\(s\) \('a/b'\)"
    ):
        PipelineSettings(sequence_ids="Abc_1, a/b").validated()
    assert PipelineSettings(sequence_ids="Abc_1, x-2\nAbc_1").sequence_id_list() == ["Abc_1", "x-2"]
    listed = tmp_path / "sequences.txt"
    listed.write_text("Abc_1\nx-2, Abc_1\n")
    assert PipelineSettings(sequence_ids=str(listed)).sequence_id_list() == ["Abc_1", "x-2"]
    listed.write_bytes(b"\xff\xfe not text")
    with pytest.raises(
        ConfigError, match=r"MAPILLARY_SEQUENCE_IDS=.* cannot be read .*UTF-8 text file"
    ):
        PipelineSettings(sequence_ids=str(listed)).validated()
