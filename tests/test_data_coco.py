"""COCO-format reader on the raccoon photographs (fixture JSON derived from their VOC XML)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.coco import load_coco
from data.errors import AnnotationError, ImageReadError, UnknownClassError
from data.voc import load_image_folder
from tests.data_fixtures import COCO_JSON, RACCOON
from utils.builders import load_split_records
from utils.config import ConfigError, load_config


def test_categories_map_to_contiguous_labels_in_id_order():
    records, class_names = load_coco(RACCOON / "images", COCO_JSON)
    assert class_names == ["dog", "raccoon"]  # category ids 5 and 18 -> labels 1 and 2
    assert all((r.labels == 2).all() for r in records)
    assert [r.image_id for r in records] == [str(i) for i in range(1, 9)]


def test_boxes_equal_the_voc_reader_on_the_same_photographs():
    records, _ = load_coco(RACCOON / "images", COCO_JSON)
    voc = {r.image_path.name: r for r in load_image_folder(RACCOON / "images", RACCOON / "annotations",
                                                           ["raccoon"], cache_dir=None)}
    for r in records:
        v = voc[r.image_path.name]
        assert (r.width, r.height) == (v.width, v.height)
        if r.image_path.name == "raccoon-143.jpg":
            assert r.n_boxes == 0  # its annotations were left out of the JSON: the image is kept
            continue
        np.testing.assert_array_equal(r.boxes, v.boxes)


def test_xywh_to_xyxy_and_iscrowd_is_difficult():
    records, _ = load_coco(RACCOON / "images", COCO_JSON)
    r177 = next(r for r in records if r.image_path.name == "raccoon-177.jpg")
    # JSON bboxes [7, 17, 150, 161] and [145, 12, 118, 134] (x, y, w, h) -> xyxy
    np.testing.assert_array_equal(r177.boxes, np.array([[7, 17, 157, 178], [145, 12, 263, 146]], np.float32))
    assert r177.difficult.tolist() == [False, True]
    s = load_coco(RACCOON / "images", COCO_JSON)[0].stats
    assert (s.images_read, s.images_kept, s.images_empty, s.boxes_kept, s.boxes_difficult) == (8, 8, 1, 9, 1)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def base(tmp_path):
    return {
        "images": [{"id": 7, "file_name": "raccoon-150.jpg", "width": 275, "height": 183}],
        "annotations": [],
        "categories": [{"id": 1, "name": "raccoon"}],
    }


def test_degenerate_and_outside_boxes(tmp_path):
    data = base(tmp_path)
    data["annotations"] = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},      # w = 0: dropped
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [-4, 100, 50, 100], "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [20.5, 30, 10, 10], "iscrowd": 0},
    ]
    records, _ = load_coco(RACCOON / "images", write_json(tmp_path / "a.json", data))
    (record,) = records
    np.testing.assert_array_equal(record.boxes, np.array([[0, 100, 46, 183], [20.5, 30, 30.5, 40]], np.float32))
    s = records.stats
    assert (s.boxes_read, s.boxes_kept, s.boxes_dropped, s.boxes_clipped) == (3, 2, 1, 1)
    assert "annotation 1 of image 7" in s.problems[0]


def test_a_box_narrower_than_float32_keeps_is_dropped(tmp_path):
    # 3000.5 + 1e-4 is 3000.5 in float32, the precision records keep: the box would reach the
    # transforms with no width and stop the loader there, without a file's name.
    data = base(tmp_path)
    data["images"][0].update(width=4000)
    data["annotations"] = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [3000.5, 10, 1e-4, 20], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [10.3, 20.7, 30.1, 40.9], "iscrowd": 0},
    ]
    records, _ = load_coco(RACCOON / "images", write_json(tmp_path / "a.json", data))
    np.testing.assert_array_equal(records[0].boxes, np.array([[10.3, 20.7, 40.4, 61.6]], np.float32))
    s = records.stats
    # a coordinate that float32 only rounds is not counted as clipped
    assert (s.boxes_kept, s.boxes_dropped, s.boxes_clipped) == (1, 1, 0)
    assert "dropped annotation 1 of image 7" in s.problems[0]


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"bad\.json: malformed JSON"):
        load_coco(RACCOON / "images", bad)
    with pytest.raises(AnnotationError, match=r"missing\.json: COCO annotation file not found"):
        load_coco(RACCOON / "images", tmp_path / "missing.json")
    data = base(tmp_path)
    del data["categories"]
    with pytest.raises(AnnotationError, match="'categories'"):
        load_coco(RACCOON / "images", write_json(tmp_path / "c.json", data))
    data = base(tmp_path)
    data["images"][0]["file_name"] = "gone.jpg"
    path = write_json(tmp_path / "d.json", data)
    with pytest.raises(ImageReadError, match=r"d\.json: image 7 file .*gone\.jpg not found"):
        load_coco(RACCOON / "images", path)
    records, _ = load_coco(RACCOON / "images", path, on_error="skip")
    assert len(records) == 0 and records.stats.images_skipped == 1
    data = base(tmp_path)
    data["annotations"] = [{"id": 1, "image_id": 7, "category_id": 99, "bbox": [1, 1, 2, 2]}]
    with pytest.raises(AnnotationError, match=r"e\.json: annotation 1 has category_id 99, which is not among"):
        load_coco(RACCOON / "images", write_json(tmp_path / "e.json", data))


def _annotation(**fields):
    return {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0, **fields}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # pycocotools would index these without a word: boxes lost or given to another image.
        (lambda d: d["annotations"].append(_annotation(image_id="7")), r"annotation 1 refers to image_id '7'"),
        (lambda d: d["annotations"].append(_annotation(image_id=8)), r"annotation 1 refers to image_id 8"),
        # A list or dict cannot be looked up in a set: a TypeError without the file's name.
        (lambda d: d["annotations"].append(_annotation(image_id=[7])), r"annotation 1 refers to image_id \[7\]"),
        (lambda d: d["annotations"].append(_annotation(category_id={"id": 1})),
         r"annotation 1 has category_id \{'id': 1\}, which is not among"),
        (lambda d: d["images"].append(dict(d["images"][0], file_name="other.jpg")), r"images id 7 is used more"),
        (lambda d: d["annotations"].extend([_annotation(), _annotation()]), r"annotations\[1\] id 1 is used more"),
        (lambda d: d["categories"].append({"id": 1, "name": "dog"}), r"categories id 1 is used more"),
        # bool("0") is True: a string flag would have made the box a crowd one.
        (lambda d: d["annotations"].append(_annotation(iscrowd="0")), r"annotation 1 iscrowd must be 0 or 1, got '0'"),
        # reshape(-1, 4) would regroup the numbers of two short boxes into one.
        (lambda d: d["annotations"].append(_annotation(bbox=[1, 2])), r"annotation 1 bbox must be 4 finite numbers"),
        (lambda d: d["annotations"].append(_annotation(bbox=[float("nan"), 1, 2, 2])), r"annotation 1 bbox must be 4 finite numbers.*nan"),
        (lambda d: d["annotations"].append(_annotation(bbox=[1, 1, float("inf"), 2])), r"annotation 1 bbox must be 4 finite numbers.*inf"),
        (lambda d: d["categories"][0].pop("name"), r"category 1 has no 'name'"),
        (lambda d: d["images"][0].update(id="7"), r"images\[0\] has no integer 'id' \(got '7'\)"),
        (lambda d: d["images"][0].update(width=0), r"image 7 has size 0x183"),
    ],
)
def test_entries_pycocotools_would_misread_are_named(tmp_path, edit, message):
    data = base(tmp_path)
    data["annotations"] = []
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # json writes NaN and Infinity, as Python's json reads them
    with pytest.raises(AnnotationError, match=r"bad\.json: " + message):
        load_coco(RACCOON / "images", path)


def test_a_class_list_maps_categories_by_name_and_unknown_ones_are_named_or_skipped():
    # The fixture's categories: dog (id 5, unused) and raccoon (id 18).
    records, class_names = load_coco(RACCOON / "images", COCO_JSON, ["raccoon"])
    assert class_names == ["raccoon"] and all((r.labels == 1).all() for r in records)
    records, _ = load_coco(RACCOON / "images", COCO_JSON, ["cat", "raccoon"])  # any order, names not in the JSON
    assert all((r.labels == 2).all() for r in records) and records.stats.boxes_kept == 9
    with pytest.raises(UnknownClassError, match=r"annotation \d+ of image \d+ has category 'raccoon', which is not "
                                                r"among the classes \['cat'\].*data.ignore_unknown_classes"):
        load_coco(RACCOON / "images", COCO_JSON, ["cat"])
    records, _ = load_coco(RACCOON / "images", COCO_JSON, ["cat"], ignore_unknown=True)
    s = records.stats
    assert (s.images_kept, s.boxes_read, s.boxes_unknown, s.boxes_kept) == (8, 9, 9, 0)


def test_two_image_entries_naming_one_file_are_refused(tmp_path):
    data = json.loads(COCO_JSON.read_text())
    data["images"][3]["file_name"] = data["images"][4]["file_name"]
    path = write_json(tmp_path / "dup.json", data)
    with pytest.raises(AnnotationError, match=r"both name the file .*: the boxes of one would be trained and "
                                              r"scored as the other's"):
        load_coco(RACCOON / "images", path)
    records, _ = load_coco(RACCOON / "images", path, on_error="skip")
    assert len(records) == 7 and records.stats.images_skipped == 1


def test_coco_keys_left_empty_are_named():
    cfg = load_config(None, ["data.format=coco", "data.classes=[raccoon]", f"data.test_images={RACCOON / 'images'}"])
    with pytest.raises(ConfigError, match="config key 'data.train_images' must be set with data.format: coco"):
        load_split_records(cfg.data, "train")
    with pytest.raises(ConfigError, match="config key 'data.test_annotations' must be set"):
        load_split_records(cfg.data, "test")
    cfg = load_config(None, ["data.format=coco", "data.classes=[dog]", f"data.test_images={RACCOON / 'images'}",
                             f"data.test_annotations={COCO_JSON}", "data.ignore_unknown_classes=true"])
    records = load_split_records(cfg.data, "test")
    assert records.stats.boxes_unknown == 9 and records.stats.boxes_kept == 0


def test_an_area_missing_or_unusable_falls_back_to_the_box_inside_the_image(tmp_path):
    data = base(tmp_path)  # one 275 x 183 image
    data["annotations"] = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [255, 10, 40, 40], "iscrowd": 0},  # 20 px inside
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 10**400, "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [60, 10, 40, 40], "area": -5, "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 1, "bbox": [110, 10, 40, 40], "area": 900.5, "iscrowd": 0},
    ]
    records, _ = load_coco(RACCOON / "images", write_json(tmp_path / "areas.json", data))
    assert records[0].areas.tolist() == [800.0, 1600.0, 1600.0, 900.5]
