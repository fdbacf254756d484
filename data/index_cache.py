"""On-disk cache of parsed dataset indexes, keyed by the annotation files' paths, mtimes and sizes.

Parsing thousands of XML files on every run is waste; a loader computes a key with `fingerprint`
(one `os.stat` per annotation file, far cheaper than parsing) and calls `load_or_build`. Any change of an
annotation file (content, size or mtime), of the file list or of the loader options gives a new key, so
a stale index is never used. Files that only parsing names (the images an annotation points to) are
checked on a hit by the loader's `still_valid`. Cache files are written atomically; an unreadable cache
file is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from utils.atomic_file import atomic_file

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Bump when the pickled payload changes shape so old cache files are ignored.
CACHE_FORMAT_VERSION = 3  # 3: ImageRecord.areas


def default_cache_dir() -> Path:
    """`$TINY_DETECTOR_CACHE/index`, or `~/.cache/tiny-detector/index` when the variable is unset."""
    base = os.environ.get("TINY_DETECTOR_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "tiny-detector") / "index"


def fingerprint(files: Iterable[str | Path], extra: object = None) -> str:
    """Hex sha256 over (path, mtime_ns, size) of each file, in the given order, plus repr(extra).

    A missing file contributes a 'missing' marker, so its later appearance changes the key.
    """
    h = hashlib.sha256()
    h.update(f"v{CACHE_FORMAT_VERSION}\n".encode())
    for path in files:
        p = os.fspath(path)
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    h.update(repr(extra).encode())
    return h.hexdigest()


def load_or_build(
    cache_dir: str | Path | None,
    name: str,
    key: str,
    build: Callable[[], T],
    store: Callable[[T], bool] = lambda _value: True,
    still_valid: Callable[[T], bool] = lambda _value: True,
) -> tuple[T, bool]:
    """Return (value, cache_hit): the cached value for `key`, or `build()` (then cached if `store(value)`).

    A cached value for which `still_valid(value)` is false (it depends on files outside the key that
    changed since) is rebuilt.

    `name` identifies the dataset (same name, different key = a stale version, removed when the new one
    is written). `cache_dir=None` disables caching. Failing to write the cache only logs a warning.
    """
    if cache_dir is None:
        return build(), False
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{key[:40]}.pkl"
    if path.is_file():
        try:
            with open(path, "rb") as f:
                payload = pickle.load(f)
            if isinstance(payload, dict) and payload.get("key") == key:
                if still_valid(payload["value"]):
                    logger.debug("index cache hit: %s", path)
                    return payload["value"], True
                logger.info("index cache %s: files it was built from changed; rebuilding", path)
            else:
                logger.warning("index cache %s does not hold key %s; rebuilding", path, key[:12])
        except Exception as exc:  # a truncated or foreign file must not stop training: rebuild it
            logger.warning("index cache %s is unreadable (%s); rebuilding", path, exc)
    value = build()
    if not store(value):
        return value, False
    try:
        with atomic_file(path) as handle:
            pickle.dump({"key": key, "value": value}, handle, protocol=pickle.HIGHEST_PROTOCOL)
        for old in cache_dir.glob(f"{name}-*.pkl"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not write index cache %s (%s); continuing without it", path, exc)
    return value, False
