"""The shared check that two GeoPackage `images` layers are equal fails on each kind of difference."""

from __future__ import annotations

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import Point

from mapillary_assets_tests.support.assertions import assert_same_images


def images_layer() -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {
            "image_id": ["101", "102", "103"],
            "blur_value": [12.5, 340.0, 88.25],
            "creator_username": ["a", None, "c"],
        },
        geometry=[Point(8.51, 47.37), Point(8.52, 47.38), Point(8.53, 47.39)],
        crs="EPSG:4326",
    )


def test_equal_layers_pass_in_any_row_and_column_order():
    expected = images_layer()
    actual = expected.iloc[[2, 0, 1]][["creator_username", "geometry", "blur_value", "image_id"]]
    assert_same_images(actual, expected)


def test_an_extra_column_fails():
    actual = images_layer().assign(sobel_value=1.0)
    with pytest.raises(
        AssertionError, match=r"columns differ: missing \[\], unexpected \['sobel_value'\]"
    ):
        assert_same_images(actual, images_layer())


def test_a_missing_column_fails():
    actual = images_layer().drop(columns="creator_username")
    with pytest.raises(AssertionError, match=r"missing \['creator_username'\], unexpected \[\]"):
        assert_same_images(actual, images_layer())


def test_a_column_named_in_ignore_may_be_extra_missing_or_different():
    expected = images_layer()
    assert_same_images(expected.assign(sobel_value=1.0), expected, ignore=["sobel_value"])
    assert_same_images(
        expected.drop(columns="creator_username"), expected, ignore=["creator_username"]
    )
    assert_same_images(expected.assign(blur_value=0.0), expected, ignore=["blur_value"])


def test_a_changed_value_fails():
    actual = images_layer()
    actual.loc[1, "blur_value"] = 340.5
    with pytest.raises(AssertionError, match="blur_value"):
        assert_same_images(actual, images_layer())


def test_a_changed_null_fails():
    actual = images_layer()
    actual.loc[1, "creator_username"] = "b"
    with pytest.raises(AssertionError, match="creator_username"):
        assert_same_images(actual, images_layer())


def test_a_moved_image_fails():
    actual = images_layer()
    actual.loc[0, "geometry"] = Point(8.51, 47.370001)
    with pytest.raises(AssertionError, match="image positions differ"):
        assert_same_images(actual, images_layer())


def test_a_missing_row_fails():
    with pytest.raises(AssertionError, match="ids differ: 1 missing, 0 unexpected"):
        assert_same_images(images_layer().iloc[:2], images_layer())


def test_a_repeated_row_fails():
    expected = images_layer()
    actual = gpd.GeoDataFrame(pd.concat([expected, expected.iloc[[0]]]), crs=expected.crs)
    with pytest.raises(AssertionError, match="an image id appears twice"):
        assert_same_images(actual, expected)
