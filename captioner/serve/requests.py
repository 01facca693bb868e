"""An HTTP body -> the items to caption and the decoding options, validated before anything is queued.

Two body kinds (both carry the same options):
- multipart/form-data: file fields `image` (also `images`, `file`, `files`) and `audio`; options as plain
  fields (`strategy=beam`, `num_beams=3`, ...);
- application/json: {"images": [B64 | {"name": N, "data": B64}, ...], "audio": [...], "options": {...}};
  B64 is standard base64, optionally as a data: URL. A string that looks like a URL is refused: the server
  never fetches what a client names.

With images and sounds both given (a captioner trained on both) the i-th sound goes with the i-th image,
as in `captioner caption`. Every problem is a `RequestError`: an HTTP status, a metrics kind, one line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import typing
from dataclasses import dataclass

from captioner.config import DecodeConfig, from_dict
from captioner.errors import CaptionerError, ConfigError, one_line
from captioner.serve.settings import ServeConfig

# Options a request may set; the others (cache, compile, packed head) are the server's choice.
REQUEST_OPTIONS = ("strategy", "num_beams", "num_captions", "max_new_tokens", "min_new_tokens", "length_penalty",
                   "top_p", "top_k", "temperature", "seed", "prompt")
IMAGE_FIELDS = ("image", "images", "file", "files")
AUDIO_FIELDS = ("audio",)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class RequestError(CaptionerError):
    """A request that cannot be served: `status` (HTTP), `kind` (the errors metric's label), one line."""

    def __init__(self, message: str, *, status: int = 422, kind: str = "invalid_request"):
        super().__init__(one_line(message))
        self.status, self.kind = status, kind


@dataclass
class ParsedRequest:
    items: list[dict]           # {"image": bytes, "audio": bytes} (either or both), in request order
    names: list[dict]           # how errors name each item's inputs, {modality: name}
    decode: DecodeConfig
    prompt: str | None          # None: the captioner's own prompt


def parse_options(options: dict, default: DecodeConfig, limits: ServeConfig, *, from_form: bool = False
                  ) -> tuple[DecodeConfig, str | None]:
    """The request's decoding options over the server's defaults, checked by DecodeConfig's own rules and
    the server's limits. Form values arrive as text and are converted by the field's type."""
    unknown = sorted(set(options) - set(REQUEST_OPTIONS))
    if unknown:
        raise RequestError(f"unknown option {unknown[0]!r}; options: {', '.join(REQUEST_OPTIONS)}", kind="options")
    options = dict(options)
    prompt = options.pop("prompt", None)
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > limits.max_prompt_chars):
        raise RequestError(f"prompt must be a string of at most {limits.max_prompt_chars} characters", kind="options")
    if from_form:
        options = {k: _from_text(k, v) for k, v in options.items()}
    try:
        decode = from_dict(DecodeConfig, {**dataclasses.asdict(default), **options}, source="options")
    except ConfigError as e:
        raise RequestError(str(e).replace("DecodeConfig.", ""), kind="options") from None
    for name, limit in (("max_new_tokens", limits.max_new_tokens_limit), ("num_beams", limits.max_num_beams_limit),
                        ("num_captions", limits.max_num_captions_limit)):
        if getattr(decode, name) > limit and name in options:
            raise RequestError(f"options: {name} must be <= {limit} on this server, got {getattr(decode, name)}",
                               kind="options")
    return decode, prompt or None


def _from_text(name: str, text: str):
    hint = typing.get_type_hints(DecodeConfig)[name]
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise RequestError(f"options: {name} must be {kind.__name__}, got {text[:40]!r}", kind="options") from None


def pair_items(images: list[tuple[str, bytes]], audio: list[tuple[str, bytes]], limits: ServeConfig
               ) -> tuple[list[dict], list[dict]]:
    """Items and their names from the uploaded images and sounds (paired in order when both are given)."""
    if not images and not audio:
        raise RequestError("no input: send image (or audio) files", kind="invalid_request")
    if images and audio and len(images) != len(audio):
        raise RequestError(f"images and audio are paired in order, so their counts must match: {len(images)} "
                           f"images, {len(audio)} sounds", kind="invalid_request")
    n = max(len(images), len(audio))
    if n > limits.max_files:
        raise RequestError(f"too many inputs: {n} > {limits.max_files} per request", status=413, kind="too_many_files")
    columns = {m: files for m, files in (("image", images), ("audio", audio)) if files}
    items = [{m: files[i][1] for m, files in columns.items()} for i in range(n)]
    names = [{m: files[i][0] for m, files in columns.items()} for i in range(n)]
    return items, names


def parse_json(body: bytes, default: DecodeConfig, limits: ServeConfig) -> ParsedRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON: {e}", status=400, kind="malformed") from None
    if not isinstance(data, dict):
        raise RequestError("the JSON body must be an object {\"images\": [...], \"options\": {...}}", status=400,
                           kind="malformed")
    unknown = sorted(set(data) - {"images", "audio", "options"})
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} (expected images, audio, options)", kind="invalid_request")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError("options must be an object", kind="options")
    decode, prompt = parse_options(options, default, limits)
    columns = {}
    for key in ("images", "audio"):
        values = data.get(key) or []
        if not isinstance(values, list):
            raise RequestError(f"{key} must be a list", status=400, kind="malformed")
        if len(values) > limits.max_files:
            raise RequestError(f"too many inputs: {len(values)} > {limits.max_files} per request", status=413,
                               kind="too_many_files")
        columns[key] = [_decode_b64(v, f"{key}[{i}]") for i, v in enumerate(values)]
    items, names = pair_items(columns["images"], columns["audio"], limits)
    return ParsedRequest(items, names, decode, prompt)


def _decode_b64(value, where: str) -> tuple[str, bytes]:
    name = where
    if isinstance(value, dict):
        if set(value) - {"name", "data"} or not isinstance(value.get("data"), str):
            raise RequestError(f"{where}: expected a base64 string or {{\"name\": ..., \"data\": base64}}",
                               status=400, kind="malformed")
        name = clean_name(value.get("name"), where)
        value = value["data"]
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a base64 string, got {type(value).__name__}", status=400,
                           kind="malformed")
    if _URL.match(value):
        raise RequestError(f"{name}: URLs are not fetched; send the file's bytes (base64)", kind="invalid_request")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return name, base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: malformed base64", status=400, kind="malformed") from None


def clean_name(name, fallback: str) -> str:
    """A client-given file name as one printable line of at most 200 characters (the fallback when none)."""
    if not isinstance(name, str) or not name.strip():
        return fallback
    return one_line("".join(c if c.isprintable() else " " for c in name))
