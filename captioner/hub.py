"""The one place that talks to the Hugging Face Hub or decides we are offline.

`hub_reachable()` probes the hub once per process (HF_HUB_OFFLINE=1 skips the probe; `reset_hub_probe()`
forgets the answer); `call_hub` runs a transformers from_pretrained with `local_files_only` when offline
and `trust_remote_code=False` always, and turns failures into one `ModelLoadError` line naming a local
alternative; `hub_offline()` switches huggingface_hub / datasets to their caches for libraries without
such a flag, and restores them; `no_remote_code()` makes loaders without a trust_remote_code argument refuse
shipped code instead of asking on stdin. A model directory is untrusted input: `refuse_remote_code` rejects one
whose configs ask transformers to run code shipped with it (`auto_map`) before transformers reads it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from captioner.errors import ModelLoadError

OFFLINE_HINT = (
    "Offline, use a local path instead: an open_clip checkpoint file for clip_pretrained (with "
    "clip_model or clip_config), a directory written by save_pretrained for lm / tokenizer; "
    "or load it once on a machine with internet so it is in the Hugging Face cache."
)


HUB_HOST = "huggingface.co"


# Configs a transformers loader reads from a model directory; `auto_map` in any of them names Python code
# in that directory to import and run.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                     "feature_extractor_config.json")
MAX_CONFIG_BYTES = 64 << 20  # larger files are left to transformers (no config is this big)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; when it does not, loading by name uses the local cache
    only, so an offline machine fails in seconds instead of minutes of download retries. HF_HUB_OFFLINE
    is read at every call; the network answer is kept for the process (`reset_hub_probe` forgets it)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return _probe(timeout)


@functools.lru_cache(maxsize=1)
def _probe(timeout: float) -> bool:
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def reset_hub_probe() -> None:
    """Forget the cached network answer (the next `hub_reachable` probes again), e.g. between tests or
    after the network came back."""
    _probe.cache_clear()


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


def refuse_remote_code(directory: str | Path, *, error: type[Exception] = ModelLoadError) -> None:
    """Raise `error` ("FILE: ...") when a config in `directory` asks to run code shipped with the model
    (`auto_map`): transformers would otherwise ask on stdin whether to run it, or run it when told to
    trust it. Files that are absent or not JSON are left to the loader to report."""
    for name in REMOTE_CODE_FILES:
        path = Path(directory).expanduser() / name
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                continue
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            raise error(f"{path}: asks to run custom code shipped with the model (auto_map); captioner never "
                        "runs code from a model directory")


@contextlib.contextmanager
def no_remote_code():
    """For loaders we cannot pass trust_remote_code=False to (open_clip builds Hugging Face text towers
    itself): a model asking to run shipped code fails at once instead of asking on stdin. Restored on exit."""
    from transformers import dynamic_module_utils

    old = dynamic_module_utils.TIME_OUT_REMOTE_CODE
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0  # 0: refuse instead of prompting (transformers' CI setting)
    try:
        yield
    finally:
        dynamic_module_utils.TIME_OUT_REMOTE_CODE = old


def call_hub(load: Callable, what: str, name: str, *, hint: str = OFFLINE_HINT, **kwargs):
    """Call a transformers from_pretrained; offline, only the local cache is tried; code shipped with a
    model is never run (a local directory asking for it is refused first); failures are one
    ModelLoadError line ending with `hint`."""
    local = is_local(name)
    if local:
        refuse_remote_code(name)
    offline = not local and not hub_reachable()
    try:
        return load(name, local_files_only=offline, trust_remote_code=False, **kwargs)
    except Exception as e:  # malformed files surface as KeyError, TypeError, tokenizers' bare Exception, ...
        if local:  # the offline hint (use a local path) does not apply
            raise ModelLoadError(f"could not load {what} from local directory {name!r}: {type(e).__name__}: "
                                 f"{_brief(e)}") from None
        why = "the hub is unreachable and it is not in the local cache" if offline else _brief(e)
        raise ModelLoadError(f"could not load {what} {name!r} (hub id): {why}. {hint}") from None


def _brief(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."
