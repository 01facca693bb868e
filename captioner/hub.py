"""The one place that talks to the Hugging Face Hub or decides we are offline.

`hub_reachable()` probes the hub once per process (HF_HUB_OFFLINE=1 skips the probe); `call_hub` runs a
from_pretrained with `local_files_only` when offline and turns failures into one `ModelLoadError` line
naming a local alternative; `hub_offline()` switches huggingface_hub / datasets to their caches for
libraries without such a flag, and restores them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from captioner.errors import ModelLoadError

OFFLINE_HINT = (
    "Offline, use a local path instead: an open_clip checkpoint file for --clip-pretrained (with "
    "--clip-model or --clip-config), a directory written by save_pretrained for --lm / --tokenizer; "
    "or load it once on a machine with internet so it is in the Hugging Face cache."
)


HUB_HOST = "huggingface.co"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; when it does not, loading by name uses the local cache
    only, so an offline machine fails in seconds instead of minutes of download retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline():
    """huggingface_hub (and `datasets`, when imported) use local files and caches only, for libraries
    without a local_files_only flag; the flags are restored on exit."""
    import huggingface_hub.constants as hub_constants

    flags = [hub_constants]
    if "datasets" in sys.modules:  # only flip what is loaded: importing datasets costs seconds
        import datasets.config as ds_config

        flags.append(ds_config)
    old = [m.HF_HUB_OFFLINE for m in flags]
    for m in flags:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(flags, old):
            m.HF_HUB_OFFLINE = value


def is_local(name: str) -> bool:
    """A local directory (loaded from disk) rather than a hub id."""
    return Path(name).expanduser().is_dir()


def call_hub(load: Callable, what: str, name: str, *, hint: str = OFFLINE_HINT, **kwargs):
    """Call a transformers from_pretrained; offline, only the local cache is tried; failures are one
    ModelLoadError line ending with `hint`."""
    local = is_local(name)
    offline = not local and not hub_reachable()
    try:
        return load(name, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as e:
        where = "local directory" if local else "hub id"
        why = "the hub is unreachable and it is not in the local cache" if offline else " ".join(str(e).split())
        raise ModelLoadError(f"could not load {what} {name!r} ({where}): {why}. {hint}") from None
