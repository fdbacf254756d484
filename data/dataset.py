"""Torch dataset over ImageRecords, the batch collate function and a seeded DataLoader builder."""

from __future__ import annotations

import logging
import random
import re
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.errors import ImageReadError
from data.records import ImageRecord
from data.transforms import seed_transform

logger = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Batch = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def load_image(path: str | Path, upright: bool = False) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB with OpenCV; ImageReadError naming the file if it is
    missing, unreadable, corrupt or a truncated JPEG.

    By default the pixels come as stored, without the EXIF orientation applied: VOC annotations (labelImg's
    included) give boxes and `<size>` in that frame, and it is the size the loaders read from an image
    whose XML has none. A rotated copy would misplace every box of a square image. `upright=True` applies
    it, for a photo shown as its camera meant (detect.py).
    """
    path = Path(path)
    try:
        encoded = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read image file: {error.strerror or error}") from None
    if is_truncated_jpeg(encoded):  # checked first: cv2.imread decodes some of these with grey filler
        raise ImageReadError(f"{path}: truncated JPEG (the file ends inside its image data)")
    # IMREAD_COLOR also turns grey or RGBA files into 3 channels.
    flags = cv2.IMREAD_COLOR if upright else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        image = cv2.imdecode(np.frombuffer(encoded, np.uint8), flags) if encoded else None
    except cv2.error as error:  # e.g. more pixels than OpenCV's limit (CV_IO_MAX_IMAGE_PIXELS, 2**30)
        reason = str(error).strip().splitlines()[-1].strip()
        raise ImageReadError(f"{path}: OpenCV cannot decode this image ({reason})") from None
    if image is None:  # OpenCV reports a corrupt file by returning None, not by exception
        raise ImageReadError(f"{path}: cannot decode image (corrupt or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# In a scan's entropy-coded data, 0xFF is followed by 0x00 (a stuffed byte) or 0xD0-0xD7 (restart
# markers); any other byte after 0xFF ends the scan with a marker.
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def is_truncated_jpeg(encoded: bytes) -> bool:
    """Whether `encoded` is a JPEG that ends inside its image data, before its end-of-image marker.

    libjpeg decodes such a file with a warning on stderr and grey where the data stops. The file's
    segments are walked from its start, their lengths skipped and each scan's data searched for the marker
    that ends it, up to the first end-of-image marker (0xFF 0xD9); what follows it (a trailer, a second
    picture, the video of a phone's motion photo) is not read. Data that is not a JPEG structure is left
    to the decoder to refuse.
    """
    if not encoded.startswith(b"\xff\xd8"):
        return False
    position, size, scanned = 2, len(encoded), False
    while position + 1 < size:
        if encoded[position] != 0xFF:
            return False  # not a marker where one must be: corrupt, not truncated
        marker = encoded[position + 1]
        if marker == 0xD9:
            return False
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            position += 1 if marker == 0xFF else 2  # fill byte, or a marker without a segment
            continue
        position += 2 + int.from_bytes(encoded[position + 2:position + 4], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            scanned = True
            found = _MARKER_AFTER_SCAN.search(encoded, position)
            if found is None:
                return True
            position = found.start()
    # The data ended before the end-of-image marker. Cut before any image data, it is no picture at all:
    # the decoder refuses it.
    return scanned


class DetectionDataset(Dataset):
    """Images and boxes of `records`, passed through an albumentations `transform`.

    `__getitem__(i)` returns `(image (3, S, S) uint8 RGB, boxes (n, 4) float32 fractional xyxy in [0, 1] with
    positive area, labels (n,) int64 in 1..C-1, difficult (n,) bool)`; the model's input is the batch of
    images after `data.transforms.normalize_images`. The transform receives `image` (H, W, 3) uint8 RGB,
    `bboxes` (fractional xyxy), `labels` and `difficult` (see data/transforms.py) and must return uint8.
    Images without boxes are returned with empty (0, 4) / (0,) tensors.

    Args:
        records: the ImageRecords (boxes in 0-based continuous pixels).
        transform: an albumentations Compose with bbox_params format "albumentations" and label fields
            "labels" and "difficult" (build_train_transform / build_eval_transform).
        use_difficult: keep difficult boxes (False removes them before the transform: training without them).
        cache_images: keep decoded images (uint8) in memory after the first read; for small datasets.
            Each DataLoader worker process holds its own cache unless `preload()` ran before the workers
            were started (they then share the parent's pages).
        check_size: raise ImageReadError when a decoded image's size differs from the annotated one
            (the boxes would be wrong).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: Callable[..., dict[str, Any]],
        use_difficult: bool = True,
        *,
        cache_images: bool = False,
        check_size: bool = True,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.use_difficult = use_difficult
        self.cache_images = cache_images
        self.check_size = check_size
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    def preload(self) -> None:
        """Decode every image into the in-memory cache now (needs cache_images=True)."""
        if not self.cache_images:
            raise ValueError("preload() needs DetectionDataset(cache_images=True)")
        for i in range(len(self.records)):
            self.image(i)

    def image(self, index: int) -> np.ndarray:
        """The decoded (H, W, 3) uint8 RGB image of record `index` (from the cache when enabled)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        record = self.records[index]
        image = load_image(record.image_path)
        if self.check_size and image.shape[:2] != (record.height, record.width):
            raise ImageReadError(
                f"{record.image_path}: decoded size {image.shape[1]}x{image.shape[0]} differs from the "
                f"annotated size {record.width}x{record.height} (image {record.image_id!r})"
            )
        if self.cache_images:
            image.setflags(write=False)  # transforms must not modify the cached pixels in place
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        image = self.image(index)
        keep = np.flatnonzero(self.use_difficult | ~record.difficult)
        scale = np.array([record.width, record.height, record.width, record.height], dtype=np.float64)
        boxes = np.clip(record.boxes[keep] / scale, 0.0, 1.0).astype(np.float32)
        # A box a fraction of a pixel wide can lose its width in the fractions (the loaders judge pixels), and
        # the augmentation would refuse it.
        has_extent = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        keep, boxes = keep[has_extent], boxes[has_extent]
        out = self.transform(
            image=image, bboxes=boxes, labels=record.labels[keep], difficult=record.difficult[keep]
        )
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        difficult = np.asarray(out["difficult"], dtype=bool).reshape(-1)
        if len(out_boxes):
            # float32 rounding can turn a sliver into zero width: such boxes are unusable targets.
            np.clip(out_boxes, 0.0, 1.0, out=out_boxes)
            valid = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
            if not valid.all():
                out_boxes, labels, difficult = out_boxes[valid], labels[valid], difficult[valid]
        image_t = out["image"]
        if not isinstance(image_t, torch.Tensor):
            raise TypeError(
                f"the transform must end with ToTensorV2 (got {type(image_t).__name__} for image "
                f"{record.image_id!r})"
            )
        if image_t.dtype != torch.uint8:
            raise TypeError(
                f"the transform must return uint8 pixels (got {image_t.dtype} for image {record.image_id!r}); "
                "normalization runs on whole batches (data.transforms.normalize_images), not in the transform"
            )
        if np.shares_memory(image_t.numpy(), image):
            # A transform that leaves the pixels as they are (a resize to the size they have) hands back the
            # decoded array itself; a caller writing to the sample would write into the image cache.
            image_t = image_t.clone(memory_format=torch.preserve_format)
        return (
            image_t,
            torch.from_numpy(out_boxes),
            torch.from_numpy(labels),
            torch.from_numpy(difficult),
        )


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, S, S) images -> one (N, 3, S, S) batch in channels_last memory order.

    ToTensorV2 returns each image as a (3, S, S) view of its (S, S, 3) array, so stacking the arrays as
    they lie is a plain copy and gives channels_last, which the model uses; a contiguous NCHW stack would
    transpose every image, and the training step would then transpose the batch back (0.35 against 0.06 ms
    for 4 images of 224 x 224). Callers that want NCHW call `.contiguous()`.
    """
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)


def collate_detections(batch: Sequence[Sample]) -> Batch:
    """Stack images to (N, 3, S, S) (channels_last memory order, see `stack_images`); keep per-image boxes
    (n_i, 4), labels (n_i,), difficult (n_i,) as lists.

    Each list's tensors are views into one tensor of the whole batch. A DataLoader worker sends every
    tensor storage through its own shared-memory block, which the main process must map; with one storage
    per field a batch of 32 needs 4 blocks instead of 97 (2 workers on the 2-core CPU: about 9,000
    against 850 images/s received).
    """
    if not batch:
        raise ValueError("collate_detections got an empty batch")
    images = stack_images([sample[0] for sample in batch])
    counts = [int(sample[1].shape[0]) for sample in batch]
    boxes, labels, difficult = (
        list(torch.cat([sample[field] for sample in batch]).split(counts)) for field in (1, 2, 3)
    )
    return images, boxes, labels, difficult


def ignore_interrupts(_worker_id: int | None = None) -> None:
    """Let a DataLoader worker ignore SIGINT (Ctrl-C); usable as a `worker_init_fn`.

    Ctrl-C reaches the whole process group: each worker ran train.py's stop handler (its message printed
    once per worker) or died with a traceback. The main process stops the workers when it is done, with
    SIGTERM, which they keep: a worker that ignored it would hold its parent's exit.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy, random and the dataset's albumentations pipeline in a DataLoader worker, which ignores
    Ctrl-C (see :func:`ignore_interrupts`).

    torch gives each worker the seed `base_seed + worker_id`, where base_seed comes from the loader's
    generator, so the augmentation of a seeded loader is reproducible run to run and differs per worker
    (and per epoch unless workers are persistent).
    """
    ignore_interrupts()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    # Reach through wrappers (e.g. a Subset or a seeding wrapper) to the transform's owner.
    while dataset is not None and not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if dataset is not None:
        seed_transform(getattr(dataset, "transform", None), seed)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with `collate_detections`, a generator seeded by `seed` and `worker_init_fn`.

    With num_workers == 0 the dataset's transform is seeded from `seed` here, so single-process loading
    is reproducible too. `persistent_workers` is ignored (with a debug message) without workers;
    `shuffle` and `sampler` are mutually exclusive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    if sampler is not None and shuffle:
        raise ValueError("build_dataloader: pass either shuffle=True or a sampler, not both")
    if persistent_workers and num_workers == 0:
        logger.debug("persistent_workers needs num_workers > 0; ignored")
        persistent_workers = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers == 0:
        seed_transform(getattr(dataset, "transform", None), seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_detections,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers,
        worker_init_fn=worker_init_fn,
        generator=generator,
    )
