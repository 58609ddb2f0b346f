"""Image I/O: the load-time check that drops missing, broken or oversized files, and the decoded-and-resized cache.

An image that cannot be read, or whose header announces more pixels than the configured limit (``oversized``,
never decoded), is skipped: at load time by :func:`check_images` (counted in the load report), and, whatever the
check mode let through, at use time by :class:`ImageCache`, which raises :class:`BrokenImageError` once, remembers
the image in ``failed`` and lets the caller replace or skip what needed it (see ``data.batch.readable_groups``).

The cache resizes with the processor's own rule (``smart_resize``: both sides multiples of ``patch * merge`` = 28,
area within [min_pixels, max_pixels], aspect kept) and resampling (bicubic), so the processor's own resize of a
cached image is the identity and its pixel values equal those of the original file. The cache stores the small
resized images, bounded in bytes, so an epoch whose images fit decodes each JPEG once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rarl_fast.data.samples import ImageRef, LoadReport, Sample

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BrokenImageError",
    "ImageCache",
    "check_images",
    "load_image",
    "probe_image",
    "resized_size",
]

CheckMode = Literal["decode", "header", "off"]

MAX_IMAGE_PIXELS = 1 << 26
"""Default pixel limit (``data.max_image_pixels``): images with more pixels are skipped, never decoded."""

log = logging.getLogger(__name__)


class BrokenImageError(OSError):
    """An image that cannot be read or decoded, or is over the pixel limit; the message names the file and
    ``reason`` is the skip reason (``missing_image``, ``broken_image`` or ``oversized_image``)."""

    def __init__(self, message: str, reason: str = "broken_image"):
        super().__init__(message)
        self.reason = reason


_PILLOW_LOCK = threading.Lock()


def _leave_limit_to_us(max_pixels: int) -> None:
    """Pillow's own decompression-bomb check warns above ``Image.MAX_IMAGE_PIXELS`` and refuses above twice that;
    the pixel limit here decides instead: Pillow's is raised to at least ``max_pixels`` and its warning silenced
    (process-wide, once; images past both limits still count as oversized)."""
    from PIL import Image

    with _PILLOW_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels
        if not any(f[2] is Image.DecompressionBombWarning and f[0] == "ignore" for f in warnings.filters):
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _open(path: str | Path, max_pixels: int) -> Image.Image:
    """``Image.open`` that raises :class:`BrokenImageError` (reason ``oversized_image``) for more than ``max_pixels``
    pixels, known from the header: such an image is never decoded."""
    from PIL import Image

    _leave_limit_to_us(max_pixels)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise BrokenImageError(f"image {path} is too large ({err})", "oversized_image") from err
    if im.width * im.height > max_pixels:
        im.close()
        raise BrokenImageError(
            f"image {path} has {im.width}x{im.height} pixels, more than data.max_image_pixels={max_pixels}",
            "oversized_image",
        )
    return im


def probe_image(path: str | Path, mode: CheckMode = "decode", max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """None when ``path`` is a readable image under ``mode``, else the skip reason (``missing_image``,
    ``broken_image``, or ``oversized_image`` for more than ``max_pixels`` pixels, read from the header).

    ``decode`` decodes the whole image; a JPEG at 1/8 scale (``draft``), which still reads all of its data, so a
    truncated file fails while the check costs a fraction of a full decode. ``off`` only checks that the file
    exists.
    """
    p = Path(path)
    if not p.is_file():
        return "missing_image"
    if mode == "off":
        return None
    try:
        with _open(p, max_pixels) as im:
            if im.width < 1 or im.height < 1:
                return "broken_image"
            if mode == "decode":
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except BrokenImageError as err:
        return err.reason
    except Exception:  # any decoder failure (truncated, not an image) means unusable
        return "broken_image"
    return None


def check_images(
    samples: list[Sample],
    mode: CheckMode,
    report: LoadReport,
    workers: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[Sample]:
    """The samples whose image passes :func:`probe_image`; the others are counted in ``report.skipped`` by reason.

    Each distinct file is probed once (COCO pairs share images), in parallel threads (Pillow decodes without
    the GIL). Synthetic samples always pass.
    """
    paths = sorted({s.image for s in samples if isinstance(s.image, str)})
    if not paths:
        return samples
    workers = workers or min(8, os.cpu_count() or 1)
    probe: Callable[[str], str | None] = lambda p: probe_image(p, mode, max_pixels)
    if workers > 1 and len(paths) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = dict(zip(paths, pool.map(probe, paths, chunksize=64)))
    else:
        reasons = {p: probe(p) for p in paths}
    kept = []
    for s in samples:
        reason = reasons.get(s.image) if isinstance(s.image, str) else None
        if reason is None:
            kept.append(s)
        else:
            report.skipped[reason] += 1
    return kept


def load_image(ref: ImageRef, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image behind ``ref`` as RGB: a file decoded in full (EXIF orientation applied, as transformers'
    ``load_image`` does), or a synthetic spec rendered. Raises :class:`BrokenImageError` for a file that cannot be
    read or has more than ``max_pixels`` pixels."""
    if not isinstance(ref, str):
        return ref.render()
    from PIL import ImageOps

    if not Path(ref).is_file():
        raise BrokenImageError(f"image {ref} does not exist", "missing_image")
    try:
        with _open(ref, max_pixels) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except BrokenImageError:
        raise
    except Exception as err:
        raise BrokenImageError(f"cannot read image {ref}: {type(err).__name__}: {err}") from err


def resized_size(height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(height, width) after Qwen2.5-VL's ``smart_resize``: multiples of ``factor``, area in [min, max] pixels.

    The same rule as ``transformers``' ``smart_resize`` (written out so that this module needs no transformers).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class ImageCache:
    """Decoded RGB images resized for the processor, kept in an LRU bounded by ``max_bytes``; thread safe.

    ``get(ref)`` returns the cached image (do not modify it). ``decodes`` counts loads per reference, so tests
    and logs can check that an epoch decodes nothing twice. An image that fails to load (unreadable, or over
    ``max_image_pixels``) raises :class:`BrokenImageError` and is kept in ``failed`` (reference -> reason) with one
    warning; asking for it again raises at once, without reading the file again.
    """

    def __init__(
        self,
        *,
        min_pixels: int,
        max_pixels: int,
        factor: int = 28,
        max_bytes: int = 1 << 30,
        resample: int = 3,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.min_pixels, self.max_pixels, self.factor = min_pixels, max_pixels, factor
        self.max_bytes, self.resample, self.max_image_pixels = max_bytes, resample, max_image_pixels
        self.failed: dict[Any, str] = {}
        self._items: OrderedDict[Any, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.decodes: dict[Any, int] = {}

    @classmethod
    def for_processor(cls, processor: Any, max_mb: int = 1024, max_image_pixels: int = MAX_IMAGE_PIXELS) -> ImageCache:
        """A cache using ``processor``'s pixel bounds, patch/merge sizes and resampling."""
        ip = processor.image_processor
        size = dict(getattr(ip, "size", None) or {})
        min_pixels = int(size.get("shortest_edge") or ip.min_pixels)
        max_pixels = int(size.get("longest_edge") or ip.max_pixels)
        resample = getattr(ip, "resample", 3)
        return cls(
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            factor=int(ip.patch_size) * int(ip.merge_size),
            max_bytes=max_mb << 20,
            resample=int(getattr(resample, "value", resample)),
            max_image_pixels=max_image_pixels,
        )

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached images."""
        return self._bytes

    def _prepare(self, ref: ImageRef) -> Image.Image:
        im = load_image(ref, self.max_image_pixels)
        h, w = resized_size(
            im.height, im.width, min_pixels=self.min_pixels, max_pixels=self.max_pixels, factor=self.factor
        )
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), resample=self.resample)
        return im

    def get(self, ref: ImageRef) -> Image.Image:
        """The resized RGB image of ``ref`` (decoded on a miss); raises :class:`BrokenImageError` if unreadable."""
        with self._lock:
            im = self._items.get(ref)
            if im is not None:
                self._items.move_to_end(ref)
                self.hits += 1
                return im
            known = self.failed.get(ref)
        if known is not None:
            raise BrokenImageError(f"image {ref} was skipped before ({known})", known)
        try:
            im = self._prepare(ref)  # outside the lock: decoding runs in parallel across threads
        except BrokenImageError as err:
            with self._lock:
                self.failed[ref] = err.reason
            log.warning("skipping image (%s): %s", err.reason, err)
            raise
        size = im.width * im.height * len(im.getbands())
        with self._lock:
            self.decodes[ref] = self.decodes.get(ref, 0) + 1
            if ref not in self._items and size <= self.max_bytes:
                self._items[ref] = im
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.width * old.height * len(old.getbands())
        return im

    def get_many(self, refs: Iterable[ImageRef]) -> list[Image.Image]:
        """``[get(r) for r in refs]``."""
        return [self.get(r) for r in refs]
