"""Parsed-index cache: reused while the annotation files are unchanged, rebuilt when they change."""

from __future__ import annotations

import os

import numpy as np
import pytest

import data.voc as voc
from data.errors import ImageReadError
from data.index_cache import fingerprint, load_or_build
from data.voc import load_image_folder, load_vocdevkit
from tests.data_fixtures import VOCDEVKIT, labelimg_folder, write_jpeg, write_voc_xml


def count_parses(monkeypatch):
    calls = []
    real = voc._parse

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(voc, "_parse", counting)
    return calls


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    calls = count_parses(monkeypatch)
    sets = [("VOC2007", "trainval"), ("VOC2012", "trainval")]
    first = load_vocdevkit(VOCDEVKIT, sets, cache_dir=tmp_path)
    assert not first.cache_hit and len(calls) == 6
    second = load_vocdevkit(VOCDEVKIT, sets, cache_dir=tmp_path)
    assert second.cache_hit and len(calls) == 6  # nothing parsed again
    assert [r.image_id for r in second] == [r.image_id for r in first]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.labels.tolist() == b.labels.tolist() and a.difficult.tolist() == b.difficult.tolist()
    assert second.stats.boxes_kept == first.stats.boxes_kept == 9
    # Other options are another index.
    third = load_vocdevkit(VOCDEVKIT, sets, ["person", "dog"], ignore_unknown=True, cache_dir=tmp_path)
    assert not third.cache_hit


def test_changed_annotation_invalidates_the_cache(tmp_path, monkeypatch):
    images, annotations = labelimg_folder(tmp_path / "d", {
        "a": (40, 30, [("cat", (1, 1, 10, 10), 0)]),
        "b": (40, 30, [("cat", (2, 2, 20, 20), 0)]),
    })
    cache = tmp_path / "cache"
    assert not load_image_folder(images, annotations, ["cat"], cache_dir=cache).cache_hit
    assert load_image_folder(images, annotations, ["cat"], cache_dir=cache).cache_hit
    xml = write_voc_xml(annotations / "b.xml", "b.jpg", 40, 30, [("cat", (3, 3, 30, 25), 1)])
    st = os.stat(xml)
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    calls = count_parses(monkeypatch)
    reloaded = load_image_folder(images, annotations, ["cat"], cache_dir=cache)
    assert not reloaded.cache_hit and len(calls) == 2
    assert reloaded[1].boxes.tolist() == [[2, 2, 30, 25]] and reloaded[1].difficult.tolist() == [True]
    # One cache file per dataset: the stale one was replaced.
    assert len(list(cache.glob("folder-*.pkl"))) == 1
    # A new annotation file changes the file list, hence the key.
    labelimg_folder(tmp_path / "d", {"c": (40, 30, [])})
    assert len(load_image_folder(images, annotations, ["cat"], cache_dir=cache)) == 3


def test_loads_that_skipped_files_are_not_cached(tmp_path):
    images, annotations = labelimg_folder(tmp_path / "d", {"a": (40, 30, [])})
    (annotations / "bad.xml").write_text("<annotation>")
    cache = tmp_path / "cache"
    load_image_folder(images, annotations, ["cat"], on_error="skip", cache_dir=cache)
    assert not load_image_folder(images, annotations, ["cat"], on_error="skip", cache_dir=cache).cache_hit


def test_unreadable_cache_file_is_rebuilt(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"value": 42}

    key = fingerprint([], extra="x")
    assert load_or_build(tmp_path, "t", key, build) == ({"value": 42}, False)
    (cache_file,) = tmp_path.glob("t-*.pkl")
    cache_file.write_bytes(b"not a pickle")
    assert load_or_build(tmp_path, "t", key, build) == ({"value": 42}, False)
    assert load_or_build(tmp_path, "t", key, build) == ({"value": 42}, True)
    assert len(calls) == 2


def test_fingerprint_tracks_size_mtime_and_missing_files(tmp_path):
    f = tmp_path / "a.xml"
    f.write_text("one")
    k1 = fingerprint([f])
    assert fingerprint([f]) == k1
    f.write_text("three")
    k2 = fingerprint([f])
    assert k2 != k1
    f.unlink()
    assert fingerprint([f]) not in (k1, k2)
    assert fingerprint([], extra=("a",)) != fingerprint([], extra=("b",))


def test_cache_disabled_with_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_DETECTOR_CACHE", str(tmp_path))
    assert not load_vocdevkit(VOCDEVKIT, [("VOC2007", "val")], cache_dir=None).cache_hit
    assert not load_vocdevkit(VOCDEVKIT, [("VOC2007", "val")], cache_dir=None).cache_hit
    assert not any(tmp_path.iterdir())
    # The default cache directory follows TINY_DETECTOR_CACHE.
    load_vocdevkit(VOCDEVKIT, [("VOC2007", "val")])
    assert load_vocdevkit(VOCDEVKIT, [("VOC2007", "val")]).cache_hit
    assert list((tmp_path / "index").glob("voc-*.pkl"))


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_on_error_values(mode):
    assert load_vocdevkit(VOCDEVKIT, [("VOC2007", "val")], on_error=mode, cache_dir=None)
    with pytest.raises(ValueError, match="on_error"):
        load_vocdevkit(VOCDEVKIT, [("VOC2007", "val")], on_error="ignore", cache_dir=None)


def test_changed_or_missing_image_invalidates_the_cache(tmp_path, monkeypatch):
    # The XML of "a" has no <size>: its record's size comes from the image, which the key does not cover.
    images, annotations = labelimg_folder(tmp_path / "d", {"b": (40, 30, [])})
    write_jpeg(images / "a.jpg", 40, 30)
    write_voc_xml(annotations / "a.xml", "a.jpg", None, None, [("cat", (1, 1, 10, 10), 0)])
    cache = tmp_path / "cache"
    assert not load_image_folder(images, annotations, ["cat"], cache_dir=cache).cache_hit
    assert load_image_folder(images, annotations, ["cat"], cache_dir=cache).cache_hit
    write_jpeg(images / "a.jpg", 80, 60)
    st = os.stat(images / "a.jpg")
    os.utime(images / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = count_parses(monkeypatch)
    reloaded = load_image_folder(images, annotations, ["cat"], cache_dir=cache)
    assert not reloaded.cache_hit and len(calls) == 2
    assert (reloaded[0].width, reloaded[0].height) == (80, 60)
    # A deleted image: the load names it (or skips it) as if there were no cache.
    (images / "b.jpg").unlink()
    with pytest.raises(ImageReadError, match=r"b\.xml: image not found"):
        load_image_folder(images, annotations, ["cat"], cache_dir=cache)
    skipped = load_image_folder(images, annotations, ["cat"], on_error="skip", cache_dir=cache)
    assert [r.image_id for r in skipped] == ["a"] and skipped.stats.images_skipped == 1
