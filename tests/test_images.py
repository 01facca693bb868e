"""load_image on a generated corpus: bad files raise ImageError "PATH: REASON" with a stable reason phrase,
unusual good files come out as correct RGB, files are closed, and the pixel limit works both ways."""

import gc
import io
import os
import struct
import warnings
import zlib

import pytest
from PIL import Image, ImageFile, features

from captioner.inputs.image import MAX_PIXELS, ImageError, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
HAS_WEBP = features.check("webp")


# ------------------------------------------------------------------ building files

def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _noise(size=(96, 96)) -> Image.Image:
    """Incompressible content, so a file cut in half is cut inside its pixel data."""
    return Image.merge("RGB", [Image.effect_noise(size, 60 + 10 * i) for i in range(3)])


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR declares width x height (CRC fixed): a bomb by its header, a few bytes on disk."""
    png = _encode(Image.new("RGB", (1, 1), RED), "PNG")
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + _png_chunk(b"IHDR", ihdr) + png[33:]


def _gif_with_size(width: int, height: int) -> bytes:
    gif = bytearray(_encode(Image.new("P", (1, 1)), "GIF"))
    gif[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(gif)


def _corrupt_png_idat() -> bytes:
    """A PNG whose compressed pixel data is garbage but whose chunk CRCs are right."""
    png = _encode(_noise(), "PNG")
    i = png.index(b"IDAT")
    n = struct.unpack(">I", png[i - 4:i])[0]
    body = bytearray(png[i + 4:i + 4 + n])
    body[2:200] = bytes((j * 37 + 11) % 256 for j in range(198))
    return png[:i - 4] + _png_chunk(b"IDAT", bytes(body)) + png[i + 8 + n:]


def _bmp_with_compression(code: int) -> bytes:
    bmp = bytearray(_encode(Image.new("RGB", (4, 4), RED), "BMP"))
    bmp[30:34] = struct.pack("<I", code)  # BI_JPEG (4): a BMP holding a JPEG, which Pillow does not decode
    return bytes(bmp)


def _bad_files(tmp_path):
    """[(path, expected reason)]: a reason ending in "(" is a prefix (the rest is the library's detail)."""
    d = tmp_path / "bad"
    d.mkdir()
    jpg = _encode(_noise(), "JPEG", quality=90)
    progressive = _encode(_noise(), "JPEG", quality=90, progressive=True)
    png = _encode(_noise(), "PNG")
    gif = _encode(_noise().convert("P"), "GIF")
    cases = [
        (d / "missing.jpg", "no such file"),
        (d / "sub" / "missing.jpg", "no such file"),
        (_write(d / "empty.jpg", b""), "empty file"),
        (_write(d / "notes.jpg", b"just some text, not pixels\n" * 20), "not an image"),
        (_write(d / "random.png", bytes((i * 97 + 13) % 251 for i in range(4000))), "not an image"),
        (_write(d / "error-page.png", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
                b"<body>Not Found</body></html>\n"), "not an image (HTML page)"),
        (_write(d / "logo.svg", b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
                b'width="10" height="10"><rect width="10" height="10"/></svg>\n'), "unsupported format (SVG)"),
        (_write(d / "scan.jpg", b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"),
         "unsupported format (PDF)"),
        (_write(d / "figure.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"),
         "unsupported format (EPS/PostScript)"),  # Pillow would hand this to Ghostscript
        (_write(d / "iphone.jpg", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)),
         "unsupported format (HEIC)"),
        (_write(d / "j2k.jpg", _encode(Image.new("RGB", (16, 16), RED), "JPEG2000")),
         "unsupported format (JPEG 2000)"),  # decodable by this Pillow, refused by choice
        (_write(d / "icon.png", _encode(Image.new("RGB", (16, 16), RED), "ICO")), "unsupported format (ICO)"),
        (_write(d / "bmp-jpeg.bmp", _bmp_with_compression(4)), "unsupported format (BMP compression (4))"),
        (_write(d / "cut.jpg", jpg[:len(jpg) * 2 // 3]), "truncated"),
        (_write(d / "cut-progressive.jpg", progressive[:len(progressive) * 2 // 3]), "truncated"),
        (_write(d / "cut.png", png[:len(png) * 2 // 3]), "truncated"),
        (_write(d / "cut.gif", gif[:len(gif) // 2]), "truncated"),
        (_write(d / "jpeg-then-garbage.jpg", jpg[:2] + bytes((i * 31 + 7) % 256 for i in range(3000))),
         "corrupt image data (damaged JPEG header)"),
        (_write(d / "bad-ihdr-crc.png", png[:29] + b"\0\0\0\0" + png[33:]), "corrupt image data (damaged PNG header)"),
        (_write(d / "bad-pixels.png", _corrupt_png_idat()), "corrupt image data ("),
        (_write(d / "bomb.png", _png_with_size(100_000, 100_000)),
         "too large (100000 x 100000 pixels > limit 89478485; raise max_pixels to allow)"),
        (_write(d / "bomb.gif", _gif_with_size(65_535, 65_535)),
         "too large (65535 x 65535 pixels > limit 89478485; raise max_pixels to allow)"),
    ]
    if HAS_WEBP:
        webp = _encode(_noise(), "WEBP", quality=90)
        cases.append((_write(d / "cut.webp", webp[:len(webp) // 2]), "truncated"))
    (d / "album.jpg").mkdir()
    cases.append((d / "album.jpg", "is a directory"))
    os.symlink(d / "gone.jpg", d / "dangling.jpg")
    cases.append((d / "dangling.jpg", "broken symlink"))
    os.symlink(d / "loop-b.jpg", d / "loop-a.jpg")
    os.symlink(d / "loop-a.jpg", d / "loop-b.jpg")
    cases.append((d / "loop-a.jpg", "symlink loop"))
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "pipe.jpg")  # opening it for reading must not block
        cases.append((d / "pipe.jpg", "not a regular file"))
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything: see test_permission_denied_simulated
        locked = _write(d / "locked.jpg", jpg)
        locked.chmod(0)
        cases.append((locked, "permission denied"))
    return cases


def _good_files(tmp_path):
    """[(path, expected size, {(x, y): expected RGB})]: colours from lossy formats are compared loosely."""
    d = tmp_path / "good"
    d.mkdir()
    cases = []

    def add(name, data, size, pixels):
        cases.append((_write(d / name, data), size, pixels))

    half = Image.new("RGB", (40, 20), RED)
    half.paste(BLUE, (20, 0, 40, 20))  # left red, right blue
    add("plain.jpg", _encode(half, "JPEG", quality=95), (40, 20), {(5, 10): RED, (35, 10): BLUE})
    add("progressive.jpg", _encode(half, "JPEG", quality=95, progressive=True), (40, 20),
        {(5, 10): RED, (35, 10): BLUE})
    add("plain.png", _encode(half, "PNG"), (40, 20), {(5, 10): RED, (35, 10): BLUE})
    add("plain.bmp", _encode(half, "BMP"), (40, 20), {(5, 10): RED})
    add("plain.tif", _encode(half, "TIFF"), (40, 20), {(35, 10): BLUE})

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: stored sideways, displayed rotated 90 degrees clockwise
    add("rotated.jpg", _encode(half, "JPEG", quality=95, exif=exif.tobytes()), (20, 40),
        {(10, 5): RED, (10, 35): BLUE})  # the left (red) half ends up on top

    gray = Image.new("L", (8, 8), 200)
    add("gray.png", _encode(gray, "PNG"), (8, 8), {(0, 0): (200, 200, 200)})
    gray_trns = gray.copy()
    gray_trns.paste(0, (0, 0, 4, 8))
    add("gray-transparent.png", _encode(gray_trns, "PNG", transparency=0), (8, 8),
        {(1, 1): WHITE, (6, 6): (200, 200, 200)})

    la = Image.new("LA", (8, 8), (50, 255))
    la.putpixel((0, 0), (50, 0))
    add("gray-alpha.png", _encode(la, "PNG"), (8, 8), {(0, 0): WHITE, (5, 5): (50, 50, 50)})

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))          # fully transparent black -> white, not black
    rgba.putpixel((1, 0), (0, 0, 255, 128))      # half-transparent blue -> light blue
    add("rgba.png", _encode(rgba, "PNG"), (8, 8), {(0, 0): WHITE, (1, 0): (127, 127, 255), (4, 4): RED})

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (3 * 253))
    pal.putpixel((0, 0), 2)
    add("palette.png", _encode(pal, "PNG"), (8, 8), {(0, 0): BLUE, (4, 4): RED})
    pal_trns = pal.copy()
    pal_trns.putpixel((0, 0), 0)
    add("palette-transparent.png", _encode(pal_trns, "PNG", transparency=0), (8, 8), {(0, 0): WHITE, (4, 4): RED})
    add("palette-transparent.gif", _encode(pal_trns, "GIF", transparency=0), (8, 8), {(0, 0): WHITE, (4, 4): RED})
    pa = Image.new("PA", (8, 8), (1, 255))
    pa.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))
    pa.putpixel((0, 0), (1, 0))
    add("palette-alpha.tif", _encode(pa, "TIFF"), (8, 8), {(0, 0): WHITE, (4, 4): RED})

    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # white
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 16))     # cyan
    add("cmyk.jpg", _encode(cmyk, "JPEG", quality=95), (16, 16), {(2, 8): WHITE, (13, 8): (0, 255, 255)})

    g16 = Image.new("I;16", (3, 1))
    for x, v in enumerate((65535, 32768, 0)):
        g16.putpixel((x, 0), v)
    add("gray16.png", _encode(g16, "PNG"), (3, 1), {(0, 0): (255,) * 3, (1, 0): (128,) * 3, (2, 0): (0,) * 3})

    i32 = Image.new("I", (3, 1))
    for x, v in enumerate((-1000, 0, 1000)):  # outside 0..65535: stretched min..max
        i32.putpixel((x, 0), v)
    add("int32.tif", _encode(i32, "TIFF"), (3, 1), {(0, 0): (0,) * 3, (1, 0): (128,) * 3, (2, 0): (255,) * 3})
    f32 = Image.new("F", (3, 1))
    for x, v in enumerate((0.0, 0.5, 1.0)):  # within 0..1: scaled by 255
        f32.putpixel((x, 0), v)
    add("float.tif", _encode(f32, "TIFF"), (3, 1), {(0, 0): (0,) * 3, (1, 0): (128,) * 3, (2, 0): (255,) * 3})

    bw = Image.new("1", (8, 8), 0)
    bw.putpixel((0, 0), 1)
    add("one-bit.png", _encode(bw, "PNG"), (8, 8), {(0, 0): WHITE, (4, 4): (0, 0, 0)})

    frames = [Image.new("RGB", (10, 10), c) for c in (RED, BLUE, (0, 255, 0))]
    add("animated.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        (10, 10), {(5, 5): RED})
    add("animated.png", _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        (10, 10), {(5, 5): RED})
    if HAS_WEBP:
        add("animated.webp", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50,
                                     lossless=True), (10, 10), {(5, 5): RED})
        add("alpha.webp", _encode(rgba, "WEBP", lossless=True), (8, 8), {(0, 0): WHITE, (4, 4): RED})
    add("big-enough.png", _png_with_size(1, 1), (1, 1), {(0, 0): RED})
    return cases


def _close(a, b, tol):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def _check_good(path, size, pixels):
    im = load_image(path)
    assert im.mode == "RGB", path
    assert im.size == size, path
    lossy = path.suffix == ".jpg"
    for xy, rgb in pixels.items():
        assert _close(im.getpixel(xy), rgb, 40 if lossy else 1), (path, xy, im.getpixel(xy), rgb)


def _check_bad(path, reason):
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained traceback
    if reason.endswith("("):
        assert msg.startswith(f"{path}: {reason}") and msg.endswith(")"), msg
    else:
        assert msg == f"{path}: {reason}"


# ------------------------------------------------------------------ tests

def test_pil_truncated_loading_stays_off():
    import captioner.data  # noqa: F401  (neither module may flip Pillow's global switches)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == MAX_PIXELS == 89_478_485


def test_bad_files_raise_image_error_with_reason(tmp_path):
    cases = _bad_files(tmp_path)
    assert len({reason for _, reason in cases}) >= 15
    for path, reason in cases:
        _check_bad(path, reason)


def test_good_unusual_files_load_as_rgb(tmp_path):
    cases = _good_files(tmp_path)
    assert len(cases) >= 20
    for path, size, pixels in cases:
        _check_good(path, size, pixels)


def test_mixed_corpus_closes_every_file(tmp_path):
    good, bad = _good_files(tmp_path), _bad_files(tmp_path)
    mixed = [p for p, *_ in good] + [p for p, _ in bad]
    mixed = [p for pair in zip(mixed[::2], mixed[1::2]) for p in pair[::-1]] + mixed[len(mixed) // 2 * 2:]
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        loaded, failed = 0, 0
        for path in mixed:
            try:
                load_image(path)
                loaded += 1
            except ImageError:
                failed += 1
        gc.collect()
    assert (loaded, failed) == (len(good), len(bad))
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_result_is_detached_from_the_file(tmp_path):
    path = _write(tmp_path / "x.png", _encode(Image.new("RGB", (4, 4), RED), "PNG"))
    im = load_image(path)
    path.unlink()
    assert im.getpixel((0, 0)) == RED and im.copy().size == (4, 4)


def test_truncated_data_is_detected_by_pillow_itself(tmp_path):
    """The check relies on im.load() raising; Pillow's global switch must be off for that."""
    jpg = _encode(_noise(), "JPEG")
    path = _write(tmp_path / "cut.jpg", jpg[:len(jpg) * 2 // 3])
    with Image.open(path) as im, pytest.raises(OSError, match="truncated"):
        im.load()


def test_max_pixels_both_ways(tmp_path):
    path = _write(tmp_path / "x.png", _encode(Image.new("RGB", (64, 48), RED), "PNG"))
    assert load_image(path, max_pixels=64 * 48).size == (64, 48)
    assert load_image(path, max_pixels=None).size == (64, 48)
    _check_bad_max(path, 64 * 48 - 1, "too large (64 x 48 pixels > limit 3071; raise max_pixels to allow)")
    bomb = _write(tmp_path / "bomb.png", _png_with_size(100_000, 100_000))
    _check_bad_max(bomb, 10**10 - 1,
                   "too large (100000 x 100000 pixels > limit 9999999999; raise max_pixels to allow)")
    for bad in (0, -1, True, 1.5, "100"):
        with pytest.raises(ValueError, match="max_pixels"):
            load_image(path, max_pixels=bad)


def _check_bad_max(path, max_pixels, reason):
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=max_pixels)
    assert str(info.value) == f"{path}: {reason}"


def test_own_limit_does_not_rely_on_pillows(tmp_path, monkeypatch):
    bomb = _write(tmp_path / "bomb.png", _png_with_size(100_000, 100_000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's guard off: ours still refuses, undecoded
    _check_bad(bomb, "too large (100000 x 100000 pixels > limit 89478485; raise max_pixels to allow)")
    _check_bad_max(bomb, 1000, "too large (100000 x 100000 pixels > limit 1000; raise max_pixels to allow)")


def test_pillows_limit_still_applies_and_is_named(tmp_path, monkeypatch):
    path = _write(tmp_path / "x.png", _encode(Image.new("RGB", (64, 48), RED), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2000
    _check_bad_max(path, None, "too large (64 x 48 pixels > PIL's limit 2000; raise PIL.Image.MAX_IMAGE_PIXELS "
                               "to allow)")
    _check_bad_max(path, 1500, "too large (64 x 48 pixels > limit 1500; raise max_pixels to allow)")


def test_decompression_bomb_warning(tmp_path):
    """Between Pillow's limit and twice it, Pillow only warns: our check refuses (default limit), and an
    escalated warning is reported the same way."""
    big = _write(tmp_path / "big.png", _png_with_size(10_000, 10_000))  # 1e8 pixels: MAX_PIXELS < 1e8 < 2x
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError) as info:
        load_image(big)
    assert str(info.value) == f"{big}: too large (10000 x 10000 pixels > limit 89478485; raise max_pixels to allow)"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _check_bad_max(big, None, "too large (10000 x 10000 pixels > PIL's limit 89478485; raise "
                                  "PIL.Image.MAX_IMAGE_PIXELS to allow)")


def test_permission_denied_simulated(tmp_path, monkeypatch):
    """Root can read a chmod 000 file, so the reason is also checked with os.open failing as it would."""
    path = _write(tmp_path / "locked.jpg", _encode(Image.new("RGB", (4, 4)), "JPEG"))
    real_open = os.open

    def deny(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)
    monkeypatch.setattr(os, "open", deny)
    _check_bad(path, "permission denied")


def test_io_error_while_reading(tmp_path, monkeypatch):
    path = _write(tmp_path / "x.png", _encode(Image.new("RGB", (4, 4)), "PNG"))
    real_fdopen = os.fdopen

    class Failing(io.BufferedReader):
        def read(self, *args):
            raise OSError(5, "Input/output error")

    def fdopen(fd, mode="r", *args, **kwargs):
        return Failing(real_fdopen(fd, mode, buffering=0)) if mode == "rb" else real_fdopen(fd, mode, *args, **kwargs)
    monkeypatch.setattr(os, "fdopen", fdopen)
    _check_bad(path, "unreadable (Input/output error)")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own warning
def test_path_types_and_bad_exif(tmp_path):
    im = Image.new("RGB", (8, 6), RED)
    path = _write(tmp_path / "broken-exif.jpg", _encode(im, "JPEG", exif=b"Exif\x00\x00MM\x00*garbage"))
    assert load_image(path).size == (8, 6)  # broken EXIF does not reject the image
    assert load_image(str(path)).size == (8, 6)
    assert load_image(os.fsencode(path)).size == (8, 6)
