"""DetectionDataset, collate_detections and build_dataloader."""

from __future__ import annotations

import struct
import zlib

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from data.dataset import DetectionDataset, build_dataloader, collate_detections, load_image
from data.errors import ImageReadError
from data.records import ImageRecord
from data.transforms import build_eval_transform, build_train_transform
from data.voc import load_image_folder, load_vocdevkit
from tests.data_fixtures import RACCOON, VOCDEVKIT, write_jpeg


def raccoon_records():
    return load_image_folder(RACCOON / "images", RACCOON / "annotations", ["raccoon"],
                             split_file=RACCOON / "splits" / "train.txt", cache_dir=None)


def test_eval_item_types_shapes_and_fractional_boxes():
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "trainval")], cache_dir=None)
    dataset = DetectionDataset(records, build_eval_transform(64), use_difficult=True)
    assert len(dataset) == 3
    image, boxes, labels, difficult = dataset[2]  # 000003: 48x64, sofa (difficult) and chair
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8  # normalized later, on the batch
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and difficult.dtype == torch.bool
    # continuous (1, 29, 47, 63) and (9, 4, 30, 28) in a 48x64 image
    expected = torch.tensor([[1 / 48, 29 / 64, 47 / 48, 63 / 64], [9 / 48, 4 / 64, 30 / 48, 28 / 64]])
    torch.testing.assert_close(boxes, expected, rtol=0, atol=1e-6)
    assert labels.tolist() == [18, 9] and difficult.tolist() == [True, False]


def test_transform_that_normalizes_is_named():
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "trainval")], cache_dir=None)
    normalizing = A.Compose([A.Resize(32, 32), A.Normalize(), ToTensorV2()],
                            bbox_params=A.BboxParams(format="albumentations", label_fields=["labels", "difficult"]))
    with pytest.raises(TypeError, match=r"uint8 pixels \(got torch.float32 for image '000001'\).*normalize_images"):
        DetectionDataset(records, normalizing)[0]


def test_use_difficult_false_removes_difficult_boxes():
    records = load_vocdevkit(VOCDEVKIT, [("VOC2007", "trainval")], cache_dir=None)
    dataset = DetectionDataset(records, build_eval_transform(64), use_difficult=False)
    _, boxes, labels, difficult = dataset[2]
    assert labels.tolist() == [9] and difficult.tolist() == [False] and boxes.shape == (1, 4)


def test_image_without_boxes_is_kept(tmp_path):
    path = write_jpeg(tmp_path / "empty.jpg", 40, 30)
    record = ImageRecord("empty", path, 40, 30, np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    dataset = DetectionDataset([record], build_train_transform(32, seed=0))
    for _ in range(5):
        image, boxes, labels, difficult = dataset[0]
        assert image.shape == (3, 32, 32)
        assert boxes.shape == (0, 4) and labels.shape == (0,) and difficult.shape == (0,)


def test_collate_stacks_images_and_keeps_box_lists():
    dataset = DetectionDataset(raccoon_records(), build_eval_transform(48))
    batch = collate_detections([dataset[i] for i in range(4)])
    images, boxes, labels, difficult = batch
    assert images.shape == (4, 3, 48, 48)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(4)]))
    assert [b.shape[0] for b in boxes] == [1, 1, 1, 1] and len(labels) == len(difficult) == 4
    with pytest.raises(ValueError, match="empty batch"):
        collate_detections([])


def test_collate_keeps_each_image_s_targets_in_one_storage_per_field():
    # Boxes of 2, 0 and 3 objects: each image gets its own rows back, all of them views of one tensor.
    samples = [
        (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.rand(n, 4), torch.arange(1, n + 1), torch.arange(n) % 2 == 0)
        for n in (2, 0, 3)
    ]
    _, boxes, labels, difficult = collate_detections(samples)
    for field, got in ((1, boxes), (2, labels), (3, difficult)):
        assert [t.dtype for t in got] == [s[field].dtype for s in samples]
        assert all(torch.equal(g, s[field]) for g, s in zip(got, samples, strict=True))
        assert len({t.untyped_storage().data_ptr() for t in got}) == 1
    assert boxes[1].shape == (0, 4) and boxes[2].is_contiguous()


def test_training_items_have_valid_boxes():
    dataset = DetectionDataset(raccoon_records(), build_train_transform(96, seed=0), cache_images=True)
    for _ in range(5):
        for i in range(len(dataset)):
            _, boxes, labels, _ = dataset[i]
            assert len(boxes) == len(labels)
            if len(boxes):
                assert boxes.min() >= 0 and boxes.max() <= 1
                assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_image_cache_decodes_once(monkeypatch):
    import data.dataset as ds

    calls = []
    real = ds.load_image
    monkeypatch.setattr(ds, "load_image", lambda p: calls.append(p) or real(p))
    dataset = DetectionDataset(raccoon_records(), build_train_transform(64, seed=0), cache_images=True)
    dataset.preload()
    for _ in range(3):
        dataset[0]
        dataset[1]
    assert len(calls) == len(dataset)
    assert not dataset.image(0).flags.writeable
    uncached = DetectionDataset(raccoon_records(), build_eval_transform(64))
    with pytest.raises(ValueError, match="cache_images"):
        uncached.preload()


def test_loader_is_reproducible_with_a_seed():
    def batches(seed, workers):
        dataset = DetectionDataset(raccoon_records(), build_train_transform(64))
        loader = build_dataloader(dataset, batch_size=3, shuffle=True, num_workers=workers, pin_memory=False,
                                  persistent_workers=True, seed=seed)
        return list(loader)

    a, b, c = batches(0, 0), batches(0, 0), batches(1, 0)
    assert len(a) == 2 and a[0][0].shape == (3, 3, 64, 64)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0])
        assert all(torch.equal(p, q) for p, q in zip(x[1], y[1], strict=True))
    assert any(not torch.equal(x[0], z[0]) for x, z in zip(a, c, strict=True))
    w1, w2 = batches(5, 1), batches(5, 1)  # one worker process: seeded through worker_init_fn
    for x, y in zip(w1, w2, strict=True):
        assert torch.equal(x[0], y[0])


def test_loader_argument_checks():
    dataset = DetectionDataset(raccoon_records(), build_eval_transform(32))
    with pytest.raises(ValueError, match="shuffle"):
        build_dataloader(dataset, 2, True, 0, False, False, sampler=torch.utils.data.SequentialSampler(dataset))
    with pytest.raises(ValueError, match="batch_size"):
        build_dataloader(dataset, 0, False, 0, False, False)
    loader = build_dataloader(dataset, 4, False, 0, False, True, drop_last=True)
    assert len(loader) == 1 and not loader.persistent_workers


def test_missing_corrupt_and_resized_images_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nothere\.jpg: image file not found"):
        load_image(tmp_path / "nothere.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match=r"corrupt\.jpg: cannot decode image"):
        load_image(corrupt)
    path = write_jpeg(tmp_path / "small.jpg", 20, 10)
    record = ImageRecord("small", path, 40, 10, np.array([[0, 0, 5, 5]]), np.array([1]), np.array([False]))
    with pytest.raises(ImageReadError, match=r"small\.jpg: decoded size 20x10 differs from the annotated size 40x10"):
        DetectionDataset([record], build_eval_transform(32))[0]
    rgb = load_image(write_jpeg(tmp_path / "grey.jpg", 8, 6, value=200))
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8


def test_truncated_jpeg_is_named_instead_of_decoded_with_grey(tmp_path):
    photo = (RACCOON / "images" / "raccoon-125.jpg").read_bytes()
    for cut in (0.5, 0.99):  # OpenCV decodes both with a grey bottom and only a warning on stderr
        truncated = tmp_path / f"cut{cut}.jpg"
        truncated.write_bytes(photo[: int(len(photo) * cut)])
        with pytest.raises(ImageReadError, match=rf"cut{cut}\.jpg: truncated JPEG"):
            load_image(truncated)
    complete = load_image(RACCOON / "images" / "raccoon-125.jpg")
    # Complete files load, also with data after the end-of-image marker (a trailer, or a second picture
    # as phones append) and as progressive JPEGs, whose several scans each start with 0xFF 0xDA.
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(photo + b"\x00trailer")
    two_pictures = tmp_path / "two.jpg"
    two_pictures.write_bytes(photo + photo)
    # A phone's motion photo appends a video, whose bytes hold start-of-scan patterns by chance.
    motion = tmp_path / "motion.jpg"
    motion.write_bytes(photo + b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x00\x0c" + bytes(range(256)) * 8)
    for path in (trailer, two_pictures, motion):
        assert np.array_equal(load_image(path), complete)
    ok, progressive = cv2.imencode(".jpg", complete[..., ::-1], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and progressive.tobytes().count(b"\xff\xda") > 1
    (tmp_path / "progressive.jpg").write_bytes(progressive.tobytes())
    assert load_image(tmp_path / "progressive.jpg").shape == complete.shape
    with pytest.raises(ImageReadError, match=r"folder\.jpg: cannot read image file"):
        load_image((tmp_path / "folder.jpg").mkdir() or tmp_path / "folder.jpg")
    with pytest.raises(ImageReadError, match=r"empty\.jpg: cannot decode image"):
        load_image((tmp_path / "empty.jpg").write_bytes(b"") and None or tmp_path / "empty.jpg")


def test_exif_orientation_is_not_applied_so_boxes_stay_on_their_pixels(tmp_path):
    from PIL import Image

    # A 40 x 20 photo, white on its left quarter, tagged "rotate 90 degrees to view" (orientation 6).
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.shape == (20, 40, 3)  # the stored frame, the one annotation tools give sizes and boxes in
    assert image[:, :10].mean() > 240 and image[:, 12:].mean() < 15
    assert load_image(path, upright=True).shape == (40, 20, 3)  # as detect.py shows the photo, turned
    (record,) = load_image_folder(*_folder_without_size(tmp_path, path), ["cat"], cache_dir=None)
    assert (record.width, record.height) == (40, 20)
    item = DetectionDataset([record], build_eval_transform(32))[0]
    assert item[0].shape == (3, 32, 32)


def _folder_without_size(tmp_path, image_path):
    from tests.data_fixtures import write_voc_xml

    images = image_path.parent
    write_voc_xml(tmp_path / "annotations" / "rotated.xml", image_path.name, None, None, [("cat", (1, 1, 10, 20), 0)])
    return images, tmp_path / "annotations"


# ToTensorV2 wraps the read-only cached array before the dataset copies it, and torch warns about that.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_a_sample_never_shares_memory_with_the_image_cache(tmp_path):
    # An image already at the output size: the eval resize hands back the decoded array unchanged.
    path = write_jpeg(tmp_path / "square.jpg", 32, 32, value=200)
    record = ImageRecord("square", path, 32, 32, np.array([[2, 2, 20, 20]], np.float32), np.array([1]),
                         np.array([False]))
    dataset = DetectionDataset([record], build_eval_transform(32), cache_images=True)
    dataset[0][0].zero_()  # a caller free to write to its batch
    assert dataset[0][0].min() > 150


class _SignalHandlers(torch.utils.data.Dataset):
    """Each item: whether this process ignores SIGINT, and whether it ignores SIGTERM."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import signal

        ignored = [signal.getsignal(signal.SIGINT) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN]
        # A sample as collate_detections takes it; the flags travel as the labels of two boxes.
        return torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(2, 4), torch.tensor(ignored), torch.zeros(2, dtype=torch.bool)


def test_loader_workers_ignore_ctrl_c_but_not_their_parents_sigterm():
    # Ctrl-C reaches the workers too: each ran train.py's stop handler (one message per worker). SIGTERM
    # stays theirs: the parent stops them with it, and one that ignored it held the parent's exit.
    from data.dataset import ignore_interrupts

    for loader in (torch.utils.data.DataLoader(_SignalHandlers(), batch_size=2, num_workers=1,
                                               collate_fn=collate_detections, worker_init_fn=ignore_interrupts),
                   build_dataloader(_SignalHandlers(), 2, False, 1, False, False)):
        labels = next(iter(loader))[2]
        assert [flags.tolist() for flags in labels] == [[True, False], [True, False]]


def test_an_image_over_opencvs_pixel_limit_is_named(tmp_path):
    # A PNG header announcing 40000 x 40000 pixels: OpenCV raises (rather than returning None) above 2**30.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 40000, 40000, 1, 0, 0, 0, 0)
    path = tmp_path / "giant.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100)))
                     + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match=r"giant.png: OpenCV cannot decode this image \(.*pixels"):
        load_image(path)


def test_a_box_thinner_than_float32_fractions_hold_is_left_out_of_the_sample(tmp_path):
    path = write_jpeg(tmp_path / "wide.jpg", 1920, 1080)
    # 6e-5 px wide at x = 1001: its fractional width rounds to zero in float32.
    boxes = np.array([[1001.11, 100, 1001.11006, 200], [10, 10, 500, 500]], np.float32)
    record = ImageRecord("wide", path, 1920, 1080, boxes, np.array([1, 2]), np.array([False, False]))
    sample = DetectionDataset([record], build_eval_transform(64))[0]
    assert sample[2].tolist() == [2]  # the labels left: the thin box is gone, not an albumentations error
