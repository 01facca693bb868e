"""Reading one image file as RGB, safely: `load_image`, `ImageError`, `MAX_PIXELS`.

`load_image(path)` returns a fully decoded `PIL.Image.Image` in mode "RGB" (no open file behind it), or
raises `ImageError` with the one-line message "PATH: REASON". REASON starts with one of these stable
phrases; some add a detail in parentheses ("not an image (HTML page)", "unsupported format (SVG)"):

    no such file            broken symlink          symlink loop            is a directory
    not a regular file      permission denied       unreadable (...)        empty file
    not an image            unsupported format      truncated               corrupt image data
    too large (W x H pixels > limit N; raise max_pixels to allow)           out of memory

What is read, and how:
- Formats: JPEG (and MPO, the multi-picture JPEG cameras write), PNG/APNG, GIF, WebP, BMP, TIFF,
  PPM/PGM/PBM and AVIF (when Pillow has AVIF support). Only these parsers see the file. Other formats are
  refused as "unsupported format (NAME)" when their signature is recognised (PDF, SVG, EPS/PostScript,
  PSD, HEIC/HEIF, JPEG 2000, JPEG XL, ICO, ...), else "not an image". A file Pillow identifies but cannot
  decode (e.g. a BMP with JPEG/PNG compression) is "unsupported format (...)" too.
- Size: width * height above `max_pixels` (default `MAX_PIXELS`, Pillow's default limit) is refused right
  after the header is read, before any pixel is decoded; `max_pixels=None` turns this check off. Pillow's
  own global guard (`PIL.Image.MAX_IMAGE_PIXELS`, which raises above twice that value) still applies
  underneath: such an image is "too large (... > PIL's limit N; raise PIL.Image.MAX_IMAGE_PIXELS to
  allow)". Pillow also warns (`DecompressionBombWarning`) above its limit; this module changes no warning
  filter or other global setting, and when that warning is escalated to an error it becomes "too large" too.
- Truncated or damaged data is an error: this module never sets `ImageFile.LOAD_TRUNCATED_IMAGES` and
  checks that the pixel data decodes completely.
- Animated GIF / WebP / APNG and multi-picture files: the first frame.
- EXIF orientation is applied (a photo taken in portrait comes out in portrait). Broken EXIF data does
  not reject the image: the pixels are kept as stored (Pillow may warn; an error is logged as a warning).
- Colour modes become RGB:
  * with alpha (RGBA, LA, PA, premultiplied RGBa) or a transparent colour (P, L or RGB with a tRNS
    "transparency"): composited onto white, so transparent pixels come out white rather than black;
  * 16-bit grayscale (I;16, I;16B, ...): the high byte (value >> 8, so 65535 -> 255, 32768 -> 128);
  * 32-bit integer (I): values within 0..65535 are treated as 16-bit (>> 8); any other range is stretched
    linearly from its minimum (0) to its maximum (255);
  * float (F): values within 0..1 are scaled by 255; any other range is stretched from minimum to maximum;
    NaN counts as the minimum and infinities are clipped to the finite range;
  * 1-bit, L, P, CMYK (Adobe-inverted CMYK JPEGs included), YCbCr, LAB, HSV: Pillow's conversion.
  Embedded ICC colour profiles are not applied.
- Only regular files are read: a FIFO or device is refused without blocking on it. The file is closed
  before `load_image` returns or raises (no ResourceWarning).
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import operator
import os
import re
import stat

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import one_line as _one_line
from captioner.errors import ImageError  # noqa: F401  (defined in errors.py)

logger = logging.getLogger(__name__)

MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS (about 0.25 GiB of 24-bit pixels)

# Pillow formats this module decodes, in the order tried; formats missing from this Pillow build are skipped.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "MPO", "AVIF")

# Signatures of files that are images Pillow should have identified: a failure to do so means damage.
_IMAGE_SIGNATURES = (
    (b"\xff\xd8", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Signatures of formats deliberately not read (or not readable): "unsupported format (NAME)".
_UNSUPPORTED_SIGNATURES = (
    (b"%PDF-", "PDF"),
    (b"%!PS-Adobe-", "EPS/PostScript"),
    (b"%!", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"gimp xcf", "XCF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"II\xbc", "JPEG XR"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC", b"heim": "HEIC",
                b"heis": "HEIC", b"avif": "AVIF", b"avis": "AVIF"}
_SNIFF_BYTES = 4096



def load_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The image at `path`, decoded and converted to RGB (see the module docstring for formats, colour
    modes, EXIF orientation and animations).

    `max_pixels`: refuse images whose width * height exceeds this, before decoding any pixel data
    (default `MAX_PIXELS`; None: no limit of this function's own). Raises `ImageError` ("PATH: REASON")
    for any problem with the file; ValueError for a bad `max_pixels`.
    """
    max_pixels = _check_max_pixels(max_pixels)
    fspath = os.fspath(path)
    name = os.fsdecode(fspath)
    with open_regular_file(fspath, name, error=ImageError) as f:
        return _decode_file(f, name, max_pixels)


def load_image_bytes(data: bytes, *, name: str, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Like `load_image` for encoded image bytes (a tar member, a parquet cell); `name` goes in errors."""
    max_pixels = _check_max_pixels(max_pixels)
    if not data:
        raise _error(name, "empty file")
    return _decode_file(io.BytesIO(data), name, max_pixels)


def _check_max_pixels(max_pixels):
    if max_pixels is not None:
        if isinstance(max_pixels, bool):
            raise ValueError(f"max_pixels must be a positive integer or None, not {max_pixels!r}")
        try:
            max_pixels = operator.index(max_pixels)
        except TypeError:
            raise ValueError(f"max_pixels must be a positive integer or None, not {max_pixels!r}") from None
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive integer or None, not {max_pixels!r}")
    return max_pixels


def _decode_file(f, name: str, max_pixels: int | None) -> Image.Image:
    try:
        return _decode(f, name, max_pixels)
    except ImageError:
        raise
    except OSError as e:
        if e.errno is None:  # Pillow's own OSErrors carry no errno: a decoding problem
            raise _error(name, _decode_error_reason(e, f)) from None
        raise _error(name, f"unreadable ({e.strerror or _one_line(e)})") from None  # I/O error while reading


def _error(name: str, reason: str) -> ImageError:
    return ImageError(f"{name}: {reason}")


def open_regular_file(fspath, name: str, *, error: type[ValueError], max_bytes: int | None = None):
    """A binary file object for a regular, non-empty file (of at most `max_bytes`), or `error("NAME:
    REASON")`. Shared by the image and audio readers. O_NONBLOCK keeps a FIFO from blocking the open;
    the type is then checked on the open descriptor (no race with a swapped path)."""

    def _error(name: str, reason: str):
        return error(f"{name}: {reason}")
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(fspath, flags)
    except OSError as e:
        raise _error(name, open_error_reason(fspath, e)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _error(name, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise _error(name, "not a regular file")
        if st.st_size == 0:
            raise _error(name, "empty file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _error(name, f"too large ({st.st_size} bytes > limit {max_bytes}; raise max_bytes to allow)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_error_reason(fspath, e: OSError) -> str:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return "broken symlink" if os.path.islink(fspath) else "no such file"
    if e.errno == errno.EISDIR or (e.errno in (errno.EACCES, errno.EPERM) and os.path.isdir(fspath)):
        return "is a directory"  # Windows answers EACCES for a directory
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return f"unreadable ({e.strerror or _one_line(e)})"


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """`_FORMATS` that this Pillow build can open (Image.open raises KeyError for an unknown one)."""
    Image.init()
    return tuple(fmt for fmt in _FORMATS if fmt in Image.OPEN)


def _decode(f, name: str, max_pixels: int | None) -> Image.Image:
    try:
        im = Image.open(f, formats=_open_formats())
    except UnidentifiedImageError:
        raise _error(name, _unidentified_reason(f)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _error(name, _too_large_reason(f, max_pixels, e)) from None
    except MemoryError:
        raise _error(name, "out of memory") from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        raise _error(name, _decode_error_reason(e, f)) from None
    with im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise _error(name, _too_large(width, height, max_pixels))
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _error(name, _too_large_reason(f, max_pixels, e)) from None
        except MemoryError:
            raise _error(name, "out of memory") from None
        except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as e:
            raise _error(name, _decode_error_reason(e, f)) from None
        _apply_exif_orientation(im, name)
        try:
            return _to_rgb(im)
        except (ValueError, TypeError) as e:  # a mode Pillow cannot convert, e.g. "La"
            raise _error(name, f"unsupported format (colour mode {im.mode}: {_one_line(e)})") from None


def _apply_exif_orientation(im: Image.Image, name: str) -> None:
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except MemoryError:
        raise _error(name, "out of memory") from None
    except Exception as e:  # malformed EXIF: keep the pixels as stored
        logger.warning("%s: EXIF orientation ignored (%s)", name, _one_line(e))


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new RGB image (never `im` itself, so nothing refers to the file)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    bands = im.getbands()
    if "A" in bands or "a" in bands or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """One channel of 16/32-bit integers or floats -> uint8 (rules in the module docstring)."""
    if mode.startswith("I;16"):
        return (a.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 0xFFFF:
            return (a >> 8).astype(np.uint8)
        a = a.astype(np.float64)
    else:
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        a = np.clip(np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo), lo, hi)
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _too_large(width: int, height: int, limit: int, *, pil: bool = False) -> str:
    if pil:
        return f"too large ({width} x {height} pixels > PIL's limit {limit}; raise PIL.Image.MAX_IMAGE_PIXELS to allow)"
    return f"too large ({width} x {height} pixels > limit {limit}; raise max_pixels to allow)"


def _too_large_reason(f, max_pixels: int | None, e: Exception) -> str:
    """The reason for an image Pillow refused as a decompression bomb (before `im.size` was ours to check)."""
    size = _declared_size(f)
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    pixels = size[0] * size[1] if size else int(m.group(1)) if m else None
    pil_limit = int(m.group(2)) if m else Image.MAX_IMAGE_PIXELS
    if size is None:
        if pixels is not None and max_pixels is not None and pixels > max_pixels:
            return f"too large ({pixels} pixels > limit {max_pixels}; raise max_pixels to allow)"
        return f"too large ({pixels if pixels is not None else 'too many'} pixels > PIL's limit {pil_limit}; " \
               "raise PIL.Image.MAX_IMAGE_PIXELS to allow)"
    if max_pixels is not None and pixels > max_pixels:
        return _too_large(*size, max_pixels)
    return _too_large(*size, pil_limit, pil=True)


def _declared_size(f) -> tuple[int, int] | None:
    """The width and height the header declares, read by the format's parser without Image.open's
    global decompression-bomb check (nothing is decoded); None when no parser gets that far."""
    try:
        f.seek(0)
        prefix = f.read(16)
    except OSError:
        return None
    for fmt in _open_formats():
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):
                continue
            f.seek(0)
            with factory(f, "") as probe:  # a stream it did not open: leaving `with` does not close it
                return probe.size
        except Exception:  # including a parser's own bomb check
            continue
    return None


def _decode_error_reason(e: BaseException, f) -> str:
    msg = _one_line(e)
    low = msg.lower()
    if isinstance(e, EOFError) or "truncated" in low:
        return "truncated"
    if low.startswith("unsupported "):
        return f"unsupported format ({msg[len('unsupported '):]})"
    if ("decoder" in low and "not available" in low) or "not supported" in low:
        return f"unsupported format ({msg})"
    if _riff_truncated(f):  # Pillow's WebP decoder just says "could not create decoder object"
        return "truncated"
    return f"corrupt image data ({msg})"


def _riff_truncated(f) -> bool:
    """A RIFF file (WebP) shorter than the length its header declares."""
    try:
        f.seek(0)
        head = f.read(12)
        size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return False
    return len(head) == 12 and head[:4] == b"RIFF" and int.from_bytes(head[4:8], "little") + 8 > size


def _unidentified_reason(f) -> str:
    """Why no allowed parser accepted the file, from its first bytes."""
    try:
        f.seek(0)
        head = f.read(_SNIFF_BYTES)
    except OSError as e:
        return f"unreadable ({e.strerror or _one_line(e)})"
    for sig, fmt in _IMAGE_SIGNATURES:
        if head.startswith(sig):
            return f"corrupt image data (damaged {fmt} header)"
    if head[4:8] == b"ftyp":
        box = head[8:max(16, min(int.from_bytes(head[:4], "big"), len(head)))]
        brands = [box[i:i + 4] for i in range(0, len(box) - 3, 4)]
        name = next((_HEIF_BRANDS[b] for b in brands if b in _HEIF_BRANDS), None)
        if name is None and any(b in (b"mif1", b"msf1") for b in brands):
            name = "HEIF"
        if name is not None:
            return f"unsupported format ({name})"
    for sig, fmt in _UNSUPPORTED_SIGNATURES:
        if head.startswith(sig):
            return f"unsupported format ({fmt})"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<"):
        if b"<svg" in text:
            return "unsupported format (SVG)"
        if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text or b"<body" in text:
            return "not an image (HTML page)"
    return "not an image"


