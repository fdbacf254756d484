"""VOC XML readers: VOCdevkit fixture (exact PASCAL layout), labelImg folders, bad inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from data.errors import AnnotationError, DataError, ImageReadError, SplitFileError, UnknownClassError
from data.voc import VOC_CLASSES, load_image_folder, load_vocdevkit, parse_voc_xml, read_split_file, split_ids
from tests.data_fixtures import RACCOON, VOCDEVKIT, labelimg_folder, write_jpeg, write_voc_xml


def label(name: str) -> int:
    return VOC_CLASSES.index(name) + 1


def by_id(records):
    return {r.image_id: r for r in records}


def test_vocdevkit_boxes_labels_difficult_equal_the_xml():
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "trainval")], cache_dir=None)
    assert [r.image_id for r in records] == ["000001", "000002", "000003"]
    r1, r3 = by_id(records)["000001"], by_id(records)["000003"]
    # XML dog (5, 10, 40, 44) and person (1, 1, 20, 48), 1-based inclusive -> (x-1, y-1, x2, y2)
    np.testing.assert_array_equal(r1.boxes, np.array([[4, 9, 40, 44], [0, 0, 20, 48]], dtype=np.float32))
    assert r1.labels.tolist() == [label("dog"), label("person")]
    assert r1.difficult.tolist() == [False, False]
    assert (r1.width, r1.height) == (64, 48)
    assert r1.image_path == VOCDEVKIT / "VOC2007" / "JPEGImages" / "000001.jpg"
    np.testing.assert_array_equal(r3.boxes, np.array([[1, 29, 47, 63], [9, 4, 30, 28]], dtype=np.float32))
    assert r3.labels.tolist() == [label("sofa"), label("chair")]
    assert r3.difficult.tolist() == [True, False]
    assert (r3.width, r3.height) == (48, 64)
    assert r1.boxes.dtype == np.float32 and r1.labels.dtype == np.int64 and r1.difficult.dtype == bool


def test_one_based_conversion_gives_inclusive_pixel_width(tmp_path):
    write_jpeg(tmp_path / "JPEGImages" / "a.jpg", 20, 10)
    xml = write_voc_xml(tmp_path / "Annotations" / "a.xml", "a.jpg", 20, 10, [("dog", (1, 1, 20, 10), 0),
                                                                               ("dog", (5, 3, 5, 3), 0),
                                                                               ("dog", (5, 3, 4, 3), 0)])
    record = parse_voc_xml(xml, ["dog"])
    # A box covering the whole 20x10 image, written 1..20 x 1..10, is [0, 20] x [0, 10] continuous, and
    # (5, 3, 5, 3) is pixel (5, 3) alone: [4, 5] x [2, 3], as the devkit counts it.
    np.testing.assert_array_equal(record.boxes, np.array([[0, 0, 20, 10], [4, 2, 5, 3]], dtype=np.float32))
    assert record.boxes[0, 2] - record.boxes[0, 0] == 20 - 1 + 1
    # (5, 3, 4, 3) has xmax < xmin as written: degenerate, dropped.
    assert record.n_boxes == 2


def test_person_parts_are_not_objects():
    records = by_id(load_vocdevkit(VOCDEVKIT, [("VOC2007", "test")], cache_dir=None))
    r5 = records["000005"]
    # person (with head, 2 hands, foot parts) and chair: exactly two objects
    assert r5.labels.tolist() == [label("person"), label("chair")]
    np.testing.assert_array_equal(r5.boxes, np.array([[19, 2, 45, 47], [49, 29, 64, 48]], dtype=np.float32))
    assert r5.difficult.tolist() == [False, True]
    r12 = by_id(load_vocdevkit(VOCDEVKIT, [("VOC2012", "train")], cache_dir=None))["2008_000003"]
    assert r12.labels.tolist() == [label("train"), label("person")]  # VOC2012 alphabetical element order
    np.testing.assert_array_equal(r12.boxes, np.array([[0, 9, 40, 40], [41, 4, 60, 46]], dtype=np.float32))


def test_voc07_plus_voc12_trainval():
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "trainval"), ("VOC2012", "trainval")], cache_dir=None)
    assert [r.image_id for r in records] == [
        "000001", "000002", "000003", "2008_000002", "2008_000003", "2008_000007",
    ]
    s = records.stats
    assert (s.images_read, s.images_kept, s.boxes_read, s.boxes_kept, s.boxes_difficult) == (6, 6, 9, 9, 2)
    bus = by_id(records)["2008_000007"]
    np.testing.assert_array_equal(bus.boxes, np.array([[3, 11, 44, 50]], dtype=np.float32))
    assert bus.labels.tolist() == [label("bus")] and bus.difficult.tolist() == [True]


def test_single_pair_is_accepted():
    assert len(load_vocdevkit(VOCDEVKIT, ("VOC2007", "val"), cache_dir=None)) == 1


def test_custom_class_list_with_ignore_unknown():
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "test")], ["person", "chair"], ignore_unknown=True,
                             cache_dir=None)
    r4, r5 = records
    assert r4.n_boxes == 0  # two cars, not in the list
    assert r5.labels.tolist() == [1, 2]
    assert records.stats.boxes_unknown == 2
    assert records.stats.images_empty == 1


def test_unknown_class_is_an_error_naming_file_and_class():
    with pytest.raises(UnknownClassError, match=r"000001\.xml.*'dog'.*data\.classes in a config\), or skip such objects with data\.ignore_unknown_classes: true"):
        load_vocdevkit(VOCDEVKIT, [("VOC2007", "train")], ["person"], cache_dir=None)


def test_class_list_checks():
    with pytest.raises(DataError, match="background"):
        load_vocdevkit(VOCDEVKIT, [("VOC2007", "train")], ["background", "dog"], cache_dir=None)
    with pytest.raises(DataError, match="duplicates"):
        load_vocdevkit(VOCDEVKIT, [("VOC2007", "train")], ["dog", "dog"], cache_dir=None)


def test_class_specific_split_file_reads_first_column():
    ids = read_split_file(VOCDEVKIT / "VOC2007" / "ImageSets" / "Main" / "person_trainval.txt", flag_column=True)
    assert ids == ["000001", "000002", "000003"]
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "person_trainval")], cache_dir=None)
    assert [r.image_id for r in records] == ids


def test_missing_split_file_lists_available_splits():
    with pytest.raises(SplitFileError, match=r"nosuch\.txt.*trainval"):
        load_vocdevkit(VOCDEVKIT, [("VOC2007", "nosuch")], cache_dir=None)
    with pytest.raises(DataError, match="VOC2099"):
        load_vocdevkit(VOCDEVKIT, [("VOC2099", "train")], cache_dir=None)


def test_duplicate_ids_over_sets_are_an_error():
    with pytest.raises(SplitFileError, match="000001"):
        load_vocdevkit(VOCDEVKIT, [("VOC2007", "train"), ("VOC2007", "trainval")], cache_dir=None)


def raw_xml_boxes(xml_path):
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    return np.array([[float(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
                     for o in root.findall("object")], dtype=np.float32).reshape(-1, 4)


def test_raccoon_photographs_with_split_files():
    train = load_image_folder(RACCOON / "images", RACCOON / "annotations", ["raccoon"],
                              split_file=RACCOON / "splits" / "train.txt", cache_dir=None)
    test = load_image_folder(RACCOON / "images", RACCOON / "annotations", ["raccoon"],
                             split_file=RACCOON / "splits" / "test.txt", cache_dir=None)
    assert [r.image_id for r in train] == (RACCOON / "splits" / "train.txt").read_text().split()
    assert [r.image_id for r in test] == ["raccoon-125", "raccoon-143"]
    from PIL import Image

    for r in [*train, *test]:
        expected = raw_xml_boxes(RACCOON / "annotations" / f"{r.image_id}.xml") - np.array([1, 1, 0, 0])
        np.testing.assert_array_equal(r.boxes, expected)
        assert (r.labels == 1).all() and not r.difficult.any()
        with Image.open(r.image_path) as im:
            assert im.size == (r.width, r.height)
    assert train.stats.boxes_kept == 8  # raccoon-31 and raccoon-177 have two boxes each


def test_seeded_split_without_lists_is_disjoint_and_deterministic():
    args = (RACCOON / "images", RACCOON / "annotations", ["raccoon"])
    train = [r.image_id for r in load_image_folder(*args, split="train", val_fraction=0.25, seed=3, cache_dir=None)]
    val = [r.image_id for r in load_image_folder(*args, split="val", val_fraction=0.25, seed=3, cache_dir=None)]
    assert len(val) == 3 and len(train) == 5  # a quarter of 8 on average; 3 for this seed
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(p.stem for p in (RACCOON / "annotations").glob("*.xml"))
    again = [r.image_id for r in load_image_folder(*args, split="test", test_fraction=0.25, seed=3, cache_dir=None)]
    assert again == val  # "test" is the held-out part, test_fraction the same setting
    others = {tuple(split_ids(train + val, "val", 0.25, s)) for s in range(6)}
    assert len(others) > 1  # the seed matters
    with pytest.raises(DataError, match="split"):
        load_image_folder(*args, split="holdout", cache_dir=None)


def test_a_random_split_keeps_every_image_in_its_part_when_files_are_added_or_removed():
    ids = [f"img{i:05d}" for i in range(4000)]
    held_out = split_ids(ids, "test", 0.2, seed=7)
    assert abs(len(held_out) / len(ids) - 0.2) < 0.02  # the fraction on average
    grown = split_ids(ids + [f"new{i}" for i in range(500)], "test", 0.2, seed=7)
    assert [i for i in grown if i.startswith("img")] == held_out  # no image moved between the parts
    assert split_ids(ids[::3], "test", 0.2, seed=7) == [i for i in held_out if i in set(ids[::3])]
    # the same ids in any order or position: each id's part depends on the id and the seed only
    assert sorted(split_ids(ids[::-1], "test", 0.2, seed=7)) == sorted(held_out)
    assert split_ids(ids, "test", 0.2, seed=8) != held_out
    assert split_ids(["raccoon-1", "raccoon-3"], "test", 0.25, seed=3) == ["raccoon-3"]  # fixed across versions


def test_degenerate_and_outside_boxes_are_dropped_or_clipped_and_counted(tmp_path, caplog):
    images, annotations = labelimg_folder(tmp_path, {
        "a": (64, 48, [("cat", (10, 10, 9, 30), 0),       # xmax < xmin: dropped
                       ("cat", (0, 1, 70, 40), 0),        # reaches outside: clipped to [0, 64]
                       ("cat", (100, 60, 120, 80), 0),    # entirely outside: dropped
                       ("cat", (5, 5, 20, 20), 1)]),
        "b": (32, 32, []),                                # empty: kept
    })
    with caplog.at_level(logging.INFO, logger="data.voc"):
        records = load_image_folder(images, annotations, ["cat"], cache_dir=None)
    a, b = records
    np.testing.assert_array_equal(a.boxes, np.array([[0, 0, 64, 40], [4, 4, 20, 20]], dtype=np.float32))
    assert a.difficult.tolist() == [False, True]
    assert b.n_boxes == 0 and b.boxes.shape == (0, 4)
    s = records.stats
    assert (s.images_read, s.images_kept, s.images_empty) == (2, 2, 1)
    assert (s.boxes_read, s.boxes_kept, s.boxes_dropped, s.boxes_clipped) == (4, 2, 2, 1)
    text = caplog.text
    assert "a.xml: dropped box [10.0, 10.0, 9.0, 30.0] (xmax < xmin or ymax < ymin)" in text
    assert "a.xml: clipped box" in text and "b.xml: no boxes" in text
    assert "boxes read 4, kept 2 (1 difficult), dropped 2, clipped 1" in text


def test_malformed_xml_names_the_file(tmp_path):
    images, annotations = labelimg_folder(tmp_path, {"good": (20, 20, [("cat", (1, 1, 5, 5), 0)])})
    write_jpeg(images / "bad.jpg", 20, 20)
    (annotations / "bad.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(AnnotationError, match=r"bad\.xml: malformed XML"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)
    records = load_image_folder(images, annotations, ["cat"], on_error="skip", cache_dir=None)
    assert [r.image_id for r in records] == ["good"]
    assert records.stats.images_skipped == 1 and "bad.xml" in records.stats.problems[0]


def test_missing_image_names_the_file(tmp_path):
    images, annotations = labelimg_folder(tmp_path, {"x": (20, 20, [("cat", (1, 1, 5, 5), 0)])})
    (images / "x.jpg").unlink()
    with pytest.raises(ImageReadError, match=r"x\.xml: image not found"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)


def test_bad_values_name_file_and_field(tmp_path):
    images, annotations = labelimg_folder(tmp_path, {"x": (20, 20, [("cat", (1, 1, "five", 5), 0)])})
    with pytest.raises(AnnotationError, match=r"x\.xml: object 0 \(cat\) <bndbox> <xmax> is not a number: 'five'"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)
    write_voc_xml(annotations / "x.xml", "x.jpg", 20, 20, [("cat", (1, 1, 5, 5), "maybe")])
    with pytest.raises(AnnotationError, match=r"<difficult> must be 0 or 1"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)


def test_missing_size_is_read_from_the_image(tmp_path):
    write_jpeg(tmp_path / "images" / "x.jpg", 30, 12)
    write_voc_xml(tmp_path / "annotations" / "x.xml", "x.jpg", None, None, [("cat", (1, 1, 30, 12), 0)])
    (record,) = load_image_folder(tmp_path / "images", tmp_path / "annotations", ["cat"], cache_dir=None)
    assert (record.width, record.height) == (30, 12)
    assert record.boxes.tolist() == [[0, 0, 30, 12]]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_coordinates_and_sizes_name_file_and_field(tmp_path, value):
    # float() reads all of these; a NaN box would otherwise reach the augmentation, an infinite one be clipped.
    images, annotations = labelimg_folder(tmp_path, {"x": (20, 20, [("cat", (1, 1, value, 5), 0)])})
    with pytest.raises(AnnotationError, match=rf"x\.xml: object 0 \(cat\) <bndbox> <xmax> is not a finite number: '{value}'"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)
    write_voc_xml(annotations / "x.xml", "x.jpg", value, 20, [("cat", (1, 1, 5, 5), 0)])
    with pytest.raises(AnnotationError, match=rf"x\.xml: <size> width/height are not finite numbers: '{value}' x '20'"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)


def test_split_file_encodings_and_ids_with_spaces(tmp_path):
    split = tmp_path / "train.txt"
    split.write_bytes("\ufeffa\r\nb\r\n".encode())  # a byte-order mark, as some Windows editors write
    assert read_split_file(split) == ["a", "b"]
    split.write_text("a\nb\n", encoding="utf-16")
    with pytest.raises(SplitFileError, match=r"train\.txt: not a UTF-8 text file"):
        read_split_file(split)
    # labelImg keeps file names with spaces, also ones that end like a flag of VOC's class-specific
    # lists, which are an id and a flag and only read as such in a VOCdevkit.
    split.write_text("IMG 001.jpg\nIMG 002\n000005 -1\n000007  1\n")
    assert read_split_file(split) == ["IMG 001", "IMG 002", "000005 -1", "000007  1"]
    assert read_split_file(split, flag_column=True) == ["IMG 001", "IMG 002", "000005", "000007"]
    images, annotations = labelimg_folder(tmp_path / "d", {"IMG 001": (20, 20, [("cat", (1, 1, 5, 5), 0)]),
                                                          "raccoon": (20, 20, [("cat", (1, 1, 5, 5), 0)]),
                                                          "raccoon 1": (20, 20, [("cat", (2, 2, 9, 9), 0)])})
    split.write_text("IMG 001\nraccoon 1\n")
    records = load_image_folder(images, annotations, ["cat"], split_file=split, cache_dir=None)
    assert [(r.image_id, r.image_path.name) for r in records] == [("IMG 001", "IMG 001.jpg"),
                                                                   ("raccoon 1", "raccoon 1.jpg")]


def test_an_empty_split_is_an_error(tmp_path):
    split = tmp_path / "test.txt"
    split.write_text("\n  \n")
    with pytest.raises(SplitFileError, match=r"test\.txt: lists no image id"):
        read_split_file(split)
    images, annotations = labelimg_folder(tmp_path / "d", {"a": (20, 20, []), "b": (20, 20, [])})
    # neither of the two ids hashes below 0.2 with seed 0
    with pytest.raises(DataError, match=r"the 'test' part of a random split of 2 annotation files with "
                                        r"data.test_fraction=0.2 and data.split_seed=0 is empty; change the "
                                        r"fraction or the seed"):
        load_image_folder(images, annotations, ["cat"], split="test", val_fraction=0.2, cache_dir=None)


def test_an_annotation_pairs_with_the_image_of_its_own_name_before_its_filename(tmp_path, caplog):
    # Images and annotations renamed together by a script: a.xml still says <filename>b.jpg</filename>.
    images, annotations = labelimg_folder(tmp_path, {"a": (40, 30, [("cat", (1, 1, 10, 10), 0)]),
                                                     "b": (40, 30, [("cat", (5, 5, 20, 20), 0)])})
    write_voc_xml(annotations / "a.xml", "b.jpg", 40, 30, [("cat", (1, 1, 10, 10), 0)])
    with caplog.at_level(logging.WARNING):
        records = by_id(load_image_folder(images, annotations, ["cat"], cache_dir=None))
    assert records["a"].image_path == images / "a.jpg" and records["b"].image_path == images / "b.jpg"
    assert "a.xml: <filename> 'b.jpg' names another image than the annotation's own a.jpg" in caplog.text
    # An annotation named apart from its image still finds it through <filename>.
    write_voc_xml(annotations / "photo-a.xml", "a.jpg", 40, 30, [("cat", (1, 1, 10, 10), 0)])
    (annotations / "a.xml").unlink()
    records = by_id(load_image_folder(images, annotations, ["cat"], cache_dir=None))
    assert records["photo-a"].image_path == images / "a.jpg"


def test_two_annotations_of_one_image_are_an_error(tmp_path, caplog):
    images, annotations = labelimg_folder(tmp_path, {"a": (40, 30, [("cat", (1, 1, 10, 10), 0)])})
    write_voc_xml(annotations / "a copy.xml", "a.jpg", 40, 30, [("cat", (1, 1, 10, 10), 0)])
    with pytest.raises(AnnotationError, match=r"a\.xml and .*a copy\.xml both annotate image .*a\.jpg"):
        load_image_folder(images, annotations, ["cat"], cache_dir=None)
    with caplog.at_level(logging.WARNING):
        records = load_image_folder(images, annotations, ["cat"], cache_dir=None, on_error="skip")
    assert [r.image_id for r in records] == ["a"] and records.stats.images_skipped == 1


@pytest.mark.parametrize("name", ["000001.png", "000001.JPG", "000001.jpeg"])
def test_a_vocdevkit_tree_takes_other_image_extensions(tmp_path, name):
    base = tmp_path / "VOCdevkit" / "VOC2007"
    write_jpeg(base / "JPEGImages" / name, 50, 40)
    write_voc_xml(base / "Annotations" / "000001.xml", "000001.jpg", 50, 40, [("cat", (1, 2, 20, 30), 0)])
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    records = load_vocdevkit(tmp_path / "VOCdevkit", ("VOC2007", "test"), cache_dir=None)
    assert records[0].image_path == base / "JPEGImages" / name and records[0].boxes.tolist() == [[0, 1, 20, 30]]


def test_an_upper_case_filename_of_the_annotations_own_image_is_taken_as_written(tmp_path, monkeypatch, caplog):
    # labelImg writes <filename>IMG_0001.JPG</filename>; on a case-insensitive file system IMG_0001.jpg, the
    # first extension tried, "exists" too, and is the same file.
    images, annotations = tmp_path / "images", tmp_path / "annotations"
    write_jpeg(images / "IMG_0001.JPG", 30, 20)
    write_voc_xml(annotations / "IMG_0001.xml", "IMG_0001.JPG", 30, 20, [("cat", (1, 1, 10, 10), 0)])
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: real_is_file(self) or any(
        p.name.lower() == self.name.lower() for p in self.parent.glob("*")))
    with caplog.at_level(logging.WARNING):
        records = load_image_folder(images, annotations, ["cat"], cache_dir=None)
    assert records[0].image_path == images / "IMG_0001.JPG" and "names another image" not in caplog.text


def test_a_filename_of_the_annotations_own_name_must_be_an_image_beside_the_others(tmp_path):
    images, annotations = labelimg_folder(tmp_path, {"a": (30, 20, [("cat", (1, 1, 10, 10), 0)])})
    (images / "a.heic").write_bytes(b"not an image OpenCV reads")
    elsewhere = write_jpeg(tmp_path / "originals" / "a.jpg", 300, 200)
    for filename in ("a.heic", str(elsewhere)):
        write_voc_xml(annotations / "a.xml", filename, 30, 20, [("cat", (1, 1, 10, 10), 0)])
        assert load_image_folder(images, annotations, ["cat"], cache_dir=None)[0].image_path == images / "a.jpg"


def test_a_random_split_reads_annotations_in_subfolders(tmp_path):
    images, annotations = labelimg_folder(tmp_path, {"a": (30, 20, [("cat", (1, 1, 10, 10), 0)])})
    write_jpeg(images / "b.jpg", 30, 20)
    write_voc_xml(annotations / "day2" / "b.xml", "b.jpg", 30, 20, [("cat", (2, 2, 12, 12), 0)])
    records = load_image_folder(images, annotations, ["cat"], split="all", cache_dir=None)
    assert sorted(r.image_id for r in records) == ["a", "day2/b"]
    assert by_id(records)["day2/b"].image_path == images / "b.jpg"  # through its <filename>


def test_a_filename_naming_the_photo_where_it_was_annotated_is_no_other_image_of_the_set(tmp_path, caplog):
    images, annotations = labelimg_folder(tmp_path, {"a": (30, 20, [("cat", (1, 1, 10, 10), 0)])})
    original = write_jpeg(tmp_path / "camera" / "IMG_7.jpg", 30, 20)
    write_voc_xml(annotations / "a.xml", str(original), 30, 20, [("cat", (1, 1, 10, 10), 0)])
    with caplog.at_level(logging.WARNING):
        records = load_image_folder(images, annotations, ["cat"], cache_dir=None)
    assert records[0].image_path == images / "a.jpg" and "names another image" not in caplog.text
