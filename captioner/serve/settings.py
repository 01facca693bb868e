"""`ServeConfig`: the server's address, batching and limits; every field documented once (CLI flags of
`captioner serve` are generated from it, as for the other configs)."""

from __future__ import annotations

from dataclasses import dataclass

from captioner.config import _check_numbers, _doc
from captioner.errors import ConfigError
from captioner.inputs.image import MAX_PIXELS


@dataclass
class ServeConfig:
    """How `captioner serve` listens, batches and limits requests."""

    host: str = _doc("Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).",
                     default="127.0.0.1")
    port: int = _doc("TCP port (0: any free port, printed at start).", default=8000)
    max_batch_size: int = _doc("Most items (images, sounds) in one model call; 1 turns batching off.", default=32)
    max_wait_ms: float = _doc("How long the first waiting request waits for others to join its batch.",
                              default=10.0)
    max_queue: int = _doc("Most items waiting for the model; a request beyond it is answered 503 with "
                          "Retry-After.", default=256)
    max_body_mb: float = _doc("Largest request body, in MiB (413 above).", default=64.0)
    max_files: int = _doc("Most items in one request.", default=32)
    max_pixels: int = _doc("Images of more pixels are refused from their header, before decoding "
                           "(decompression-bomb guard).", default=MAX_PIXELS)
    request_timeout_s: float = _doc("A request not answered within this many seconds gets 504 (its batch goes "
                                    "on).", default=60.0)
    drain_timeout_s: float = _doc("On SIGTERM, how long in-flight requests may take to finish before the "
                                  "server exits anyway.", default=30.0)
    max_new_tokens_limit: int = _doc("Largest max_new_tokens a request may ask for.", default=100)
    max_num_beams_limit: int = _doc("Largest num_beams a request may ask for.", default=10)
    max_num_captions_limit: int = _doc("Largest num_captions a request may ask for.", default=10)
    max_prompt_chars: int = _doc("Longest prompt a request may give.", default=200)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        _check_numbers(self, {"max_batch_size": ">=1", "max_wait_ms": ">=0f", "max_queue": ">=1",
                              "max_body_mb": ">0", "max_files": ">=1", "max_pixels": ">=1",
                              "request_timeout_s": ">0", "drain_timeout_s": ">=0f", "max_new_tokens_limit": ">=1",
                              "max_num_beams_limit": ">=1", "max_num_captions_limit": ">=1",
                              "max_prompt_chars": ">=0"})
        if self.max_files > self.max_queue:
            raise ConfigError(f"max_files ({self.max_files}) cannot exceed max_queue ({self.max_queue}): such a "
                              "request could never be queued")
