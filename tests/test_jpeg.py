"""The batched JPEG path on CPU: same pixels as load_image + open_clip's transform (to a uint8 level), the
same ImageError messages, PIL fallback for what the fast path does not decode exactly, and refusal of
transforms it cannot mirror."""

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from captioner.inputs import jpeg
from captioner.inputs.image import ImageError, load_image
from captioner.inputs.jpeg import JpegPipeline, TensorPreprocess, decode_jpegs, read_jpeg
from conftest import DEVICE  # eval/gpu_bench.sh runs these on CUDA (nvjpeg)

# torchvision 0.29 deprecates decode_jpeg (in favour of TorchCodec) and warns on every call
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# One uint8 level is 1 / 255 / std ~= 0.015 in normalised units. Measured (bicubic 64 and 224, bilinear 64,
# squash 48x64; the images below): mean |diff| <= 3.5e-4, max 0.030 (two levels, a few pixels of 256 -> 224).
# A single float resize pass without PIL's rounded intermediate gives mean ~2e-3, max ~0.25.
MEAN_TOL, MAX_TOL = 1e-3, 0.035


def _picture(width: int, height: int) -> Image.Image:
    """Smooth gradients with sharp-edged shapes (where resize implementations disagree most)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 60], -1)
    im = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse([width // 5, height // 5, width // 2, height // 2], fill=(200, 30, 40))
    draw.rectangle([width // 2, height // 2, width - 10, height - 10], fill=(20, 40, 220))
    draw.line([0, height, width, 0], fill=(250, 250, 0), width=3)
    return im


@pytest.fixture
def jpegs(tmp_path):
    """Plain JPEGs of several sizes and aspect ratios (one grayscale, one smaller than 224)."""
    paths = []
    for width, height, mode in [(256, 256, "RGB"), (640, 480, "RGB"), (300, 500, "RGB"), (300, 500, "L"),
                                (100, 80, "RGB")]:
        path = tmp_path / f"{width}x{height}_{mode}.jpg"
        _picture(width, height).convert(mode).save(path, quality=90)
        paths.append(path)
    return paths


def _load_error(path, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("kwargs", [{"image_size": 64}, {"image_size": 224},
                                    {"image_size": 64, "interpolation": "bilinear"},
                                    {"image_size": (48, 64), "resize_mode": "squash"}])
def test_tensor_path_matches_pil_path(jpegs, kwargs):
    transform = open_clip.image_transform(is_train=False, **kwargs)
    preprocess = TensorPreprocess.from_transform(transform)
    assert preprocess is not None
    names = [str(p) for p in jpegs]
    batch = JpegPipeline(preprocess, DEVICE)([read_jpeg(p) for p in jpegs], names)
    for path, fast in zip(jpegs, batch):
        ref = transform(load_image(path))  # (3, S, S)
        assert fast.shape == ref.shape and fast.dtype == ref.dtype == torch.float32
        diff = (fast.cpu() - ref).abs()
        assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (path.name, diff.mean().item(), diff.max().item())
    decoded = decode_jpegs([read_jpeg(p) for p in jpegs], device=DEVICE, names=names)
    assert torch.equal(preprocess.batch(decoded), torch.stack(batch))  # (B, 3, S, S)


def test_decoded_pixels_equal_pil(jpegs):
    for path in jpegs:
        [image] = decode_jpegs([read_jpeg(path)], device=DEVICE, names=[str(path)])
        assert image.dtype == torch.uint8
        assert_same_pixels(image, torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1))


def assert_same_pixels(image: torch.Tensor, ref: torch.Tensor) -> None:
    """libjpeg-turbo (CPU) decodes exactly as PIL; nvjpeg's IDCT may differ by a level or so."""
    if image.device.type == "cpu":
        assert torch.equal(image, ref)
    else:
        diff = (image.cpu().int() - ref.int()).abs()
        assert diff.float().mean() < 1 and diff.max() <= 8, (diff.float().mean().item(), diff.max().item())


def test_read_jpeg_leaves_other_files_to_load_image(tmp_path):
    im = _picture(120, 90)
    im.save(png := tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: load_image transposes it
    im.save(rotated := tmp_path / "rotated.jpg", exif=exif)
    im.save(mpo := tmp_path / "two.mpo", "MPO", save_all=True, append_images=[im])
    im.convert("CMYK").save(cmyk := tmp_path / "cmyk.jpg")
    im.save(trailing := tmp_path / "trailing.jpg")
    trailing.write_bytes(trailing.read_bytes() + b"\0" * 16)  # valid, but does not end in EOI
    for path in (png, rotated, mpo, cmyk, trailing):
        assert read_jpeg(path) is None, path.name
        load_image(path)  # the fallback reads each
    exif[0x0112] = 1
    im.save(upright := tmp_path / "upright.jpg", exif=exif)
    assert read_jpeg(upright) is not None


def test_read_jpeg_raises_load_image_errors(tmp_path, jpegs):
    (empty := tmp_path / "empty.jpg").write_bytes(b"")
    for path in (tmp_path / "missing.jpg", empty, tmp_path):
        with pytest.raises(ImageError) as info:
            read_jpeg(path)
        assert str(info.value) == _load_error(path)
    with pytest.raises(ImageError) as info:
        read_jpeg(jpegs[0], max_pixels=1000)
    assert str(info.value) == _load_error(jpegs[0], max_pixels=1000)
    assert "too large (256 x 256 pixels > limit 1000" in str(info.value)


def test_bad_file_in_batch_gives_load_image_error(tmp_path, jpegs):
    data = jpegs[1].read_bytes()
    (truncated := tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (garbage := tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8" + b"not a jpeg" * 50)
    assert read_jpeg(truncated) is None and read_jpeg(garbage) is None  # never sent to the fast decoder...
    paths = [jpegs[0], truncated, jpegs[2], garbage, jpegs[3]]
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]  # ...but if it were
    out = decode_jpegs(datas, device=DEVICE, names=[str(p) for p in paths])
    assert str(out[1]) == _load_error(truncated) == f"{truncated}: truncated"
    assert str(out[3]) == _load_error(garbage)
    for i in (0, 2, 4):
        [alone] = decode_jpegs([datas[i]], device=DEVICE, names=[str(paths[i])])
        assert torch.equal(out[i], alone)
    preprocess = TensorPreprocess.from_transform(open_clip.image_transform(64, is_train=False))
    results = JpegPipeline(preprocess, DEVICE)(datas, [str(p) for p in paths])
    assert [type(r) for r in results] == [torch.Tensor, ImageError, torch.Tensor, ImageError, torch.Tensor]


def test_files_the_fast_decoder_refuses_go_through_pil(tmp_path, jpegs, monkeypatch):
    """As when nvjpeg refuses a JPEG it does not support (e.g. CMYK): the PIL decode takes over."""
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported")
    monkeypatch.setattr(jpeg, "decode_jpeg", refuse)
    _picture(80, 60).convert("CMYK").save(cmyk := tmp_path / "cmyk.jpg")
    paths = [*jpegs[:2], cmyk]
    datas = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    for path, image in zip(paths, decode_jpegs(datas, device=DEVICE, names=[str(p) for p in paths])):
        assert image.device.type == torch.device(DEVICE).type
        assert torch.equal(image.cpu(), torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1))


@pytest.mark.parametrize("transform", [
    T.Compose([*open_clip.image_transform(64, is_train=False).transforms, T.RandomHorizontalFlip()]),
    T.Compose([T.Lambda(lambda im: im), *open_clip.image_transform(64, is_train=False).transforms]),
    T.Compose([T.Resize(64, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(64), T.ToTensor()]),
    T.Compose([T.Resize(64), T.CenterCrop(64)]),  # no ToTensor
    T.Compose([T.ToTensor(), T.Resize(64)]),  # resizing a float tensor does not round like PIL
    open_clip.image_transform((48, 64), is_train=False),  # ResizeKeepRatio
    open_clip.image_transform(64, is_train=False, resize_mode="longest"),  # CenterCropOrPad
], ids=["flip", "lambda", "nearest", "no-to-tensor", "resize-after-to-tensor", "keep-ratio", "longest"])
def test_from_transform_refuses_what_it_cannot_mirror(transform):
    assert TensorPreprocess.from_transform(transform) is None


def test_preprocess_wants_uint8_rgb():
    preprocess = TensorPreprocess.from_transform(open_clip.image_transform(64, is_train=False))
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess(torch.zeros(3, 32, 32))


def test_iter_captions_on_device_path_matches_pil_path(tmp_path, jpegs, make_captioner, monkeypatch):
    """The captioning loop with JPEGs decoded in the main process: same order, same errors, same captions as
    the PIL path for a batch mixing plain JPEGs, a PNG, a rotated JPEG, a truncated JPEG and a missing file."""
    png = tmp_path / "p.png"
    _picture(120, 90).save(png)
    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _picture(100, 60).save(rotated, exif=exif)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpegs[0].read_bytes()[:600])
    items = [str(p) for p in [*jpegs, png, rotated, truncated, tmp_path / "missing.jpg"]]
    cap = make_captioner(seed=3)
    pil = list(cap.iter_captions(items, batch_size=4, jpeg_on_device=False))
    decoded = []
    call = JpegPipeline.__call__
    monkeypatch.setattr(JpegPipeline, "__call__", lambda self, datas, names: decoded.extend(names) or
                        call(self, datas, names))
    fast = list(cap.iter_captions(items, batch_size=4, jpeg_on_device=True, num_workers=1))
    assert decoded == list(map(str, jpegs))  # only the plain JPEGs (the cut one lacks its end marker: PIL)
    assert [(it, err) for it, _, err in fast] == [(it, err) for it, _, err in pil]
    assert sum(err is not None for _, _, err in pil) == 2
    assert [c for _, c, _ in fast] == [c for _, c, _ in pil]


def test_on_device_path_feeds_the_encoder_pil_close_pixels(jpegs, make_captioner):
    cap = make_captioner(seed=3)
    seen = []
    encode = cap.model.encode_images
    cap.model.encode_images = lambda images: seen.append(images) or encode(images)
    for on_device in (False, True):
        list(cap.iter_captions([str(p) for p in jpegs], batch_size=len(jpegs), jpeg_on_device=on_device))
    pil, fast = seen
    assert fast.shape == pil.shape and fast.dtype == pil.dtype
    assert (fast - pil).abs().mean() < MEAN_TOL and (fast - pil).abs().max() < MAX_TOL
