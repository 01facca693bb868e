"""A batched JPEG path for captioning: raw bytes in the loader, decoding and preprocessing on the device.

The PIL path (`images.load_image` + open_clip's eval transform) decodes and resizes every image on the CPU
in a DataLoader worker. On a GPU that becomes the bottleneck, so for plain JPEGs the work is split:

- `read_jpeg(path)` (in a worker) opens the file like `load_image`, reads the JPEG header with PIL (no
  pixel decode) and returns the file's raw bytes as a uint8 tensor, or None for anything the fast path
  would not decode exactly like `load_image`: other formats, MPO, colour modes other than RGB and L
  (nvjpeg may refuse CMYK or convert it differently), an EXIF orientation to apply, and files that do not
  end in the EOI marker (truncated, or with trailing data: whether nvjpeg notices truncation is not
  documented, so PIL decides).
  None means "use `load_image`"; the errors it raises itself are `load_image`'s, word for word.
- `JpegPipeline` (in the main process) decodes a batch with `torchvision.io.decode_jpeg` (nvjpeg on CUDA,
  libjpeg-turbo on CPU) and runs `TensorPreprocess`, the eval transform as tensor ops, on that device. A
  file the fast decoder refuses (damaged data, or an odd JPEG nvjpeg does not handle) is decoded by
  `load_image_bytes` instead, so it either works or gives `load_image`'s `ImageError`, returned in its slot.

It is meant for CUDA; device="cpu" runs the same code (that is how it is tested). On CPU the decoded
pixels equal PIL's. The resize mirrors PIL's (two separable antialiased passes, each rounded to uint8),
but in float arithmetic rather than PIL's fixed point: a few pixels differ by one or two uint8 levels
(0.015 to 0.03 after normalisation), and nvjpeg's IDCT may differ from libjpeg's by a level or so, so a
caption can in rare cases differ from the PIL path's.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns (DeprecationWarning) on
each call; this module leaves warning filters alone.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from captioner.inputs.image import (
    MAX_PIXELS,
    ImageError,
    _check_max_pixels,
    _error,
    _too_large,
    load_image,
    load_image_bytes,
    open_regular_file,
)

_EOI = b"\xff\xd9"  # JPEG end-of-image marker
_TRANSPOSING_ORIENTATIONS = range(2, 9)  # the EXIF orientations ImageOps.exif_transpose acts on


class TensorPreprocess:
    """open_clip's eval transform on uint8 image tensors (3, H, W) on any device -> float32 (3, S, S).

    Build it with `from_transform`, which accepts only transforms it mirrors exactly.
    """

    def __init__(self, pixel_ops: list, tensor_ops: list):
        self.pixel_ops = list(pixel_ops)  # on float (3, H, W) holding uint8 values, like PIL's steps
        self.tensor_ops = list(tensor_ops)  # after ToTensor's /255

    @classmethod
    def from_transform(cls, transform) -> TensorPreprocess | None:
        """The tensor version of `transform` (a torchvision Compose, as `open_clip.image_transform` makes),
        or None when some step cannot be mirrored exactly: the caller then keeps the PIL path.

        Mirrored: Resize (bicubic or bilinear), CenterCrop and RGB conversions before ToTensor,
        Normalize after it.
        """
        from open_clip.transform import MaybeConvertMode, MaybeToTensor, _convert_to_rgb

        pixel_ops, tensor_ops, tensor = [], [], False  # tensor: ToTensor seen
        for step in _flatten(transform):
            if type(step) in (T.ToTensor, MaybeToTensor) and not tensor:
                tensor = True
            elif type(step) is T.Resize and not tensor:
                if step.interpolation not in (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR):
                    return None
                size = [step.size] if isinstance(step.size, int) else list(step.size)
                pixel_ops.append(functools.partial(_resize_like_pil, size=size, max_size=step.max_size,
                                                   interpolation=step.interpolation))
            elif type(step) is T.CenterCrop and not tensor:
                pixel_ops.append(functools.partial(TF.center_crop, output_size=list(step.size)))
            elif (step is _convert_to_rgb or (type(step) is MaybeConvertMode and step.mode == "RGB")) and not tensor:
                pass  # decoded tensors are RGB already
            elif type(step) is T.Normalize and tensor:
                tensor_ops.append(functools.partial(TF.normalize, mean=step.mean, std=step.std))
            else:
                return None
        if not tensor:
            return None
        return cls(pixel_ops, tensor_ops)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One decoded image: uint8 (3, H, W) -> float32 (3, S, S) on the same device."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 RGB image tensor (3, H, W), got {image.dtype} {tuple(image.shape)}")
        x = image.float()  # (3, H, W), values 0..255
        for op in self.pixel_ops:
            x = op(x)
        x = x / 255  # ToTensor
        for op in self.tensor_ops:
            x = op(x)
        return x

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded images of any sizes -> (B, 3, S, S)."""
        return torch.stack([self(image) for image in images])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pixel_ops={self.pixel_ops}, tensor_ops={self.tensor_ops})"


def _flatten(transform):
    if type(transform) is T.Compose:
        for step in transform.transforms:
            yield from _flatten(step)
    else:
        yield transform


def _resize_like_pil(x: torch.Tensor, *, size: list[int], max_size: int | None,
                     interpolation: T.InterpolationMode) -> torch.Tensor:
    """PIL's resize of a uint8 image, on a float (3, H, W) tensor of uint8 values: a horizontal then a
    vertical antialiased pass (torch's antialiased kernels use PIL's filters), each rounded half up and
    clamped to 0..255 as PIL stores its intermediate image. One float pass without the rounding differs
    from PIL by up to ~30 levels at sharp edges (bicubic overshoot is clipped between PIL's passes)."""
    height, width = x.shape[-2:]
    # torchvision's own size rule, the one Resize applies to PIL images
    new_height, new_width = TF._compute_resized_output_size((height, width), size, max_size)
    if new_width != width:
        x = _to_uint8_values(F.resize(x, [height, new_width], interpolation=interpolation, antialias=True))
    if new_height != height:
        x = _to_uint8_values(F.resize(x, [new_height, new_width], interpolation=interpolation, antialias=True))
    return x


def _to_uint8_values(x: torch.Tensor) -> torch.Tensor:
    return x.add_(0.5).floor_().clamp_(0, 255)  # PIL rounds half up; torch.round would round half to even


def read_jpeg(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor | None:
    """The raw bytes of the JPEG at `path` as a uint8 tensor (N,), when the fast path decodes it exactly as
    `load_image` would; else None: read it with `load_image` (see the module docstring).

    Raises `load_image`'s `ImageError` for what it finds before the pixel data: no such file, a directory,
    an empty file, permission denied, ..., and an image over `max_pixels`.
    """
    max_pixels = _check_max_pixels(max_pixels)
    fspath = os.fspath(path)
    name = os.fsdecode(fspath)
    with open_regular_file(fspath, name, error=ImageError) as f:
        return _plain_jpeg(f, name, max_pixels)


def read_jpeg_bytes(data: bytes, *, name: str, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor | None:
    """`read_jpeg` for encoded bytes (a tar member, a parquet cell), as `load_image_bytes` is to `load_image`."""
    if not data:
        raise _error(name, "empty file")
    return _plain_jpeg(io.BytesIO(data), name, _check_max_pixels(max_pixels))


def _plain_jpeg(f, name: str, max_pixels: int | None) -> torch.Tensor | None:
    try:
        with Image.open(f, formats=("JPEG",)) as im:  # the header only, parsed as load_image parses it
            width, height = im.size
            plain = (im.format == "JPEG" and im.mode in ("RGB", "L")
                     and im.getexif().get(0x0112, 1) not in _TRANSPOSING_ORIENTATIONS)
    except Exception:  # noqa: BLE001 - load_image reports whatever went wrong, in its words
        return None
    if max_pixels is not None and width * height > max_pixels:
        raise _error(name, _too_large(width, height, max_pixels))
    if not plain:
        return None
    try:
        f.seek(0)
        data = f.read()
    except OSError:
        return None
    if not data.endswith(_EOI):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class JpegBytes:
    """An image a loader worker left encoded, for `JpegPipeline.resolve` to decode on the device."""

    data: torch.Tensor  # uint8 (N,) file bytes
    name: str


def prepare_image(source: str | os.PathLike | bytes, *, name: str, preprocess, max_pixels: int | None,
                  jpegs: bool) -> torch.Tensor | JpegBytes:
    """The loader-worker half: an image file (path) or its bytes -> the model's input tensor (3, S, S) via
    PIL and `preprocess`, or, with `jpegs`, `JpegBytes` when it is a plain JPEG. Raises ImageError."""
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    if jpegs:
        data = (read_jpeg_bytes(bytes(source), name=name, max_pixels=max_pixels) if is_bytes
                else read_jpeg(source, max_pixels=max_pixels))
        if data is not None:
            return JpegBytes(data, name)
    image = (load_image_bytes(bytes(source), name=name, max_pixels=max_pixels) if is_bytes
             else load_image(source, max_pixels=max_pixels))
    return preprocess(image)


def decode_jpegs(datas: list[torch.Tensor], *, device: str | torch.device,
                 names: list[str]) -> list[torch.Tensor | ImageError]:
    """Decode JPEG bytes (uint8 (N,) CPU tensors, from `read_jpeg`) on `device`: uint8 (3, H, W) RGB
    tensors, or, for a file neither the fast decoder nor PIL can read, `load_image`'s ImageError for it
    (returned in its slot, not raised). `names` (os.fsdecode(path), as `load_image` uses) go in errors.

    The whole batch is decoded in one call (one nvjpeg batch on CUDA); since one bad file fails that call,
    it is then retried file by file, and a file that still fails goes through `load_image_bytes` on CPU.
    """
    if len(datas) != len(names):
        raise ValueError(f"{len(datas)} JPEG byte tensors but {len(names)} names")
    if not datas:
        return []
    device = torch.device(device)
    try:
        images = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        if device.type == "cuda":  # nvjpeg writes on a stream of its own: wait for it before anyone reads
            torch.cuda.synchronize(device)
        return images
    except RuntimeError:
        pass
    images = []
    for data, name in zip(datas, names):
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            images.append(_decode_with_pil(data, name, device))
    return images


def _decode_with_pil(data: torch.Tensor, name: str, device: torch.device) -> torch.Tensor | ImageError:
    try:
        # max_pixels=None: read_jpeg has applied the caller's limit to this file already
        image = load_image_bytes(data.numpy().tobytes(), name=name, max_pixels=None)
    except ImageError as e:
        return e
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)  # (H, W, 3) -> (3, H, W)


class JpegPipeline:
    """The main-process half of the fast path: JPEG bytes from `read_jpeg` -> preprocessed images on `device`."""

    def __init__(self, preprocess: TensorPreprocess, device: str | torch.device):
        self.preprocess = preprocess
        self.device = torch.device(device)

    def __call__(self, datas: list[torch.Tensor], names: list[str]) -> list[torch.Tensor | ImageError]:
        """One float32 (3, S, S) tensor on the device per file, or that file's ImageError."""
        decoded = decode_jpegs(datas, device=self.device, names=names)
        return [image if isinstance(image, ImageError) else self.preprocess(image) for image in decoded]

    def resolve(self, inputs: list[torch.Tensor | JpegBytes]) -> list[torch.Tensor | ImageError]:
        """A loader batch from `prepare_image`: its `JpegBytes` decoded together; tensors pass through."""
        slots = [i for i, x in enumerate(inputs) if isinstance(x, JpegBytes)]
        out = list(inputs)
        if slots:
            for i, image in zip(slots, self([inputs[i].data for i in slots], [inputs[i].name for i in slots])):
                out[i] = image
        return out
