"""The one place that talks to the Hugging Face Hub or decides we are offline.

`hub_reachable()` probes the hub once per process (HF_HUB_OFFLINE=1 skips the probe; `reset_hub_probe()`
forgets the answer); `call_hub` runs a transformers from_pretrained with `local_files_only` when offline
and `trust_remote_code=False` always, and turns failures into one `ModelLoadError` line naming a local
alternative; `hub_offline()` switches huggingface_hub / datasets to their caches for libraries without
such a flag, and restores them; `no_remote_code()` makes loaders without a trust_remote_code argument refuse
shipped code instead of asking on stdin. A model directory is untrusted input: `refuse_remote_code` rejects one
whose configs ask transformers to run code shipped with it (`auto_map`) before transformers reads it.

Model names: `resolve_model` turns a name into a captioner directory: a local directory as is, a known name
(`KNOWN_MODELS`: ClipCap's released weights) downloaded and converted once, or a Hub id `user/repo[@revision]`
fetched into the Hugging Face cache. Push: `push_to_hub` uploads a saved captioner with a model card
(`model_card_text` / `write_model_card`: Hub metadata, the run's eval scores and training config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

from captioner.errors import ModelLoadError

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------ model names: known names and Hub ids


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A released checkpoint in a foreign format: downloaded from `repo_id` and converted once."""

    repo_id: str
    filename: str
    revision: str | None = None  # None: the repository's main branch
    description: str = ""


# The one registry of known names (public Hub mirrors of ClipCap's released weights).
KNOWN_MODELS = {
    "clipcap-coco": KnownModel("akhaliq/CLIP-prefix-captioning-COCO-weights", "coco_weights.pt",
                               description="ClipCap MLP mapper + fine-tuned GPT-2, trained on COCO"),
    "clipcap-conceptual": KnownModel("akhaliq/CLIP-prefix-captioning-conceptual-weights", "conceptual_weights.pt",
                                     description="ClipCap MLP mapper + fine-tuned GPT-2, trained on Conceptual Captions"),
}
# What a captioner on the Hub is made of (save_pretrained's files; tokenizers write some of these).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja")
MODEL_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
LOCAL_HINT = "or pass the path of a saved captioner directory (config.json + model.safetensors)"


def split_revision(name: str) -> tuple[str, str | None]:
    """"user/repo@rev" -> ("user/repo", "rev"); no "@": (name, None)."""
    repo, at, revision = name.partition("@")
    return repo, (revision if at else None)


def resolve_model(name: str | Path) -> Path:
    """The local directory of a captioner named `name`: a local directory as it is (it always wins over a
    Hub id of the same spelling); a known name (`KNOWN_MODELS`) downloaded and converted once; a Hub id
    `user/repo[@revision]` downloaded into the Hugging Face cache (only the cache is tried offline). Any
    other name is returned as a path, for the checkpoint loader to report."""
    if isinstance(name, Path) or is_local(name):
        return Path(name).expanduser()
    if name in KNOWN_MODELS:
        return known_model_dir(name)
    if HUB_ID.fullmatch(name):
        return download_captioner(name)
    return Path(name)


def _hub_failure(e: Exception, offline: bool, hint: str = LOCAL_HINT) -> str:
    """Why a download failed, and what to do instead (one clause)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if offline or isinstance(e, LocalEntryNotFoundError):
        return (f"not in the Hugging Face cache ({_cache_dir()}) and the Hub is unreachable; download it once on a "
                f"machine with internet, {hint}")
    if isinstance(e, GatedRepoError):
        why = "the repo is gated or private (log in with `hf auth login` or set HF_TOKEN)"
    elif isinstance(e, RevisionNotFoundError):
        why = "the repo has no such revision"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such repo on the Hub (or it is private)"
    elif isinstance(e, EntryNotFoundError):
        why = "the repo lacks the file"
    else:
        why = f"{type(e).__name__}: {_brief(e)}"
    return f"{why}; {hint}"


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def converted_root() -> Path:
    """Where converted known models are kept: <HF_HOME>/captioner/converted, beside the Hub cache."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "captioner" / "converted"


def known_model_dir(name: str) -> Path:
    """A known name's captioner directory: its checkpoint fetched into the Hugging Face cache (the cache
    only when offline), converted on first use into converted_root()/NAME-REVISION, reused after."""
    import huggingface_hub

    known = KNOWN_MODELS[name]
    offline = not hub_reachable()
    what = f"{name} ({known.filename} of Hub repo {known.repo_id})"
    try:
        path = Path(huggingface_hub.hf_hub_download(known.repo_id, known.filename, revision=known.revision,
                                                    local_files_only=offline))
    except Exception as e:  # HTTP, cache and file-system errors of every kind
        hint = (f"or convert a local copy of {known.filename} (`captioner convert clipcap`, or convert_clipcap in "
                "Python) and pass the converted local directory")
        raise ModelLoadError(f"could not fetch {what}: {_hub_failure(e, offline, hint)}") from None
    # The file lives in snapshots/<commit>/: the commit names this conversion, so a new upload converts again.
    out = converted_root() / f"{name}-{path.parent.name[:12]}"
    if (out / "config.json").is_file():
        return out
    from captioner.model.clipcap import convert_clipcap

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:  # converted aside and renamed: an interrupted conversion is never taken for a finished one
        convert_clipcap(path, tmp / "model")  # a directory that does not exist yet, as for any output
        try:
            os.replace(tmp / "model", out)
        except OSError:  # another process finished first: use its directory
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s into %s", what, out)
    return out


def download_captioner(name: str) -> Path:
    """A captioner saved on the Hub as `user/repo[@revision]`: its files (never code) downloaded into the
    Hugging Face cache, or found there when the Hub is unreachable."""
    import huggingface_hub

    repo_id, revision = split_revision(name)
    offline = not hub_reachable()
    what = f"{name!r} (no such local directory; as a Hub id: repo {repo_id}" + (f", revision {revision})" if revision
                                                                                  else ")")
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                                      allow_patterns=[*MODEL_FILES, "README.md"]))
    except Exception as e:  # HTTP, cache, validation (bad repo id) and file-system errors of every kind
        raise ModelLoadError(f"could not load captioner {what}: {_hub_failure(e, offline)}") from None
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"Hub repo {repo_id}" + (f"@{revision}" if revision else "") + f" is not a saved captioner "
                             f"(no {', '.join(missing)}); {LOCAL_HINT}")
    return path


# ------------------------------------------------------------------ model cards and push

CARD_METRICS = {"Bleu_4": "bleu", "METEOR": "meteor", "ROUGE_L": "rouge", "CIDEr": "cider", "SPICE": "spice",
                "SPIDEr": "spider", "CLIPScore": "clipscore", "RefCLIPScore": "refclipscore"}


def model_dir_of(run_dir: str | Path) -> Path:
    """The captioner directory of a run: RUN_DIR itself when it holds config.json, else RUN_DIR/best, else
    RUN_DIR/last (what training writes)."""
    run_dir = Path(run_dir).expanduser()
    for d in (run_dir, run_dir / "best", run_dir / "last"):
        if (d / "config.json").is_file():
            return d
    from captioner.errors import CheckpointError

    raise CheckpointError(f"{run_dir}: no saved captioner (config.json) in it or in its best/ or last/")


def run_files(model_dir: str | Path) -> tuple[Path | None, Path | None]:
    """(scores.json, train_config.json) of the run a captioner directory belongs to, each None when absent.
    scores.json: in the directory or its parent (the run directory), or an eval/ folder of either; or in the
    eval/ folder beside the run (`make demo`: demo_out/eval) when its "model" names this directory.
    train_config.json: in the directory or its parent."""
    model_dir = Path(model_dir)
    places = (model_dir, model_dir.parent)
    own = [p / name for p in places for name in ("scores.json", "eval/scores.json")]
    scores = next((p for p in own if p.is_file()), None)
    beside = model_dir.parent.parent / "eval" / "scores.json"
    if scores is None and beside.is_file():
        try:
            named = json.loads(beside.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError):
            named = None
        if isinstance(named, str) and Path(named).expanduser().resolve() == model_dir.resolve():
            scores = beside
    configs = [p / "train_config.json" for p in places]
    return scores, next((p for p in configs if p.is_file()), None)


def _json_of(value: dict | str | Path | None) -> dict | None:
    from captioner.config import load_json

    return load_json(value) if isinstance(value, (str, Path)) else value


def model_card_text(model_dir: str | Path, *, repo_id: str | None = None, scores: dict | str | Path | None = None,
                    train_config: dict | str | Path | None = None) -> str:
    """README.md for a saved captioner: Hub metadata (library_name, pipeline_tag, tags, datasets, metrics
    with the values of `scores`, a scores.json of `captioner eval`), then usage, architecture, evaluation,
    the training config, intended use and limitations. scores / train_config (dicts or JSON files) default to
    the run's own files (`run_files`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from captioner.model.checkpoint import read_config

    config, meta = read_config(model_dir)
    found_scores, found_config = run_files(model_dir)
    scores = scores if scores is not None else found_scores
    train_config = train_config if train_config is not None else found_config
    scores, train_config = _json_of(scores), _json_of(train_config)
    name = repo_id or Path(model_dir).resolve().name
    corpus = {k: float(v) for k, v in ((scores or {}).get("corpus") or {}).items()
              if isinstance(v, (int, float)) and math.isfinite(v)}
    data = (scores or {}).get("data") or (train_config or {}).get("data")
    dataset = str(data)[3:] if str(data).startswith("hf:") else None  # only Hub datasets go in the metadata
    shown = dataset or (Path(str(data)).name if data else "the evaluation set")
    split = (scores or {}).get("split")
    results = [EvalResult(task_type="image-to-text", dataset_type=dataset or shown, dataset_name=shown,
                          dataset_split=split, metric_type=CARD_METRICS.get(k, k.lower()), metric_name=k,
                          metric_value=round(v, 4)) for k, v in corpus.items()]
    image = "image" in config.modalities
    card_data = ModelCardData(
        library_name="captioner", pipeline_tag="image-to-text" if image else None, model_name=name,
        tags=["captioner", "image-captioning" if image else "audio-captioning", "clip", "prefix-captioning"],
        datasets=[dataset] if dataset else None, metrics=sorted({r.metric_type for r in results}) or None,
        eval_results=results or None, base_model=config.lm if config.lm_config is None else None)
    lm = config.lm if config.lm_config is None else "a custom GPT-2 (config saved with the model)"
    if not image:
        encoder = f"{config.audio_encoder} audio encoder"
    elif config.clip_config is not None:  # an inline architecture: clip_model is not what was built
        encoder = "custom open_clip image tower (architecture and weights saved with the model)"
    else:
        encoder = f"open_clip {config.clip_model} ({config.clip_pretrained or 'weights saved with the model'})"
    lines = [f"# {name}", "",
             f"A captioner model for {' + '.join(config.modalities)} captioning: "
             f"a frozen {encoder} -> a trained {config.mapper} prefix mapper ({config.prefix_length} prefix "
             f"embeddings) -> {lm}, {'fine-tuned' if config.finetune_lm else 'frozen'}.", "",
             "## Usage", "", "With the captioner package installed (from its source checkout: `pip install -e .`):", "",
             "```bash",
             f"captioner caption photo.jpg --model {name}" if image else f"captioner caption --audio clip.wav --model {name}",
             "```", "", "```python", "from captioner import Captioner", "",
             f'cap = Captioner.from_pretrained("{name}")', 'print(cap.caption("photo.jpg"))' if image else 'print(cap.caption(audio="clip.wav"))', "```", "",
             "Loading reads config.json, model.safetensors and the tokenizer files only; no code is run from the "
             "repository. The pretrained parts not saved here (e.g. the CLIP encoder) are fetched by name.", "",
             "## Evaluation", ""]
    if corpus:
        exact = ("COCO-exact (PTB tokenizer)" if scores.get("coco_exact") else
                 "NOT COCO-exact (pure-Python tokenizer: close to, not equal to, published numbers)")
        decode = scores.get("decode") or {}
        how = ", ".join(f"{k} {decode[k]}" for k in ("strategy", "num_beams", "max_new_tokens") if k in decode)
        lines += [f"Measured with `captioner eval` on {shown}" + (f" [{split}]" if split else "") +
                  f", {len(scores.get('per_image') or {})} items" + (f", decoding: {how}" if how else "") +
                  f"; {exact}.", "", "| metric | score |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in corpus.items()], ""]
    else:
        lines += ["No evaluation scores were recorded with this model (run `captioner eval --output-dir` "
                  "and push again to add them).", ""]
    lines += ["## Training", ""]
    if train_config:
        lines += [f"Trained with `captioner train` on {Path(str(data)).name if data else 'an unnamed set'}"
                  + (f" ({meta['step']} steps)" if meta.get("step") else "") + ". The training config:", "",
                  "<details><summary>train_config.json</summary>", "", "```json",
                  json.dumps(train_config, indent=2, ensure_ascii=False), "```", "", "</details>", ""]
    else:
        lines += ["The training config was not found beside the model.", ""]
    lines += ["## Intended use", "",
              f"Short descriptive captions of {'images' if image else 'sounds'} like those of the training set: "
              "alt-text drafts, search indexing, dataset bootstrapping, and research on captioning.", "",
              "## Limitations", "",
              "- Captions describe what is typical of the training data; out-of-domain inputs get confident but "
              "wrong captions. Check captions before using them where errors matter (e.g. accessibility).",
              "- Biases of the encoder, the language model and the caption data (gender, culture, geography) "
              "carry over to the captions.",
              "- Scores above are on the named set only and say little about other data.", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content, ignore_metadata_errors=False))


def write_model_card(model_dir: str | Path, out_path: str | Path, *, repo_id: str | None = None,
                     scores: dict | str | Path | None = None, train_config: dict | str | Path | None = None) -> Path:
    """Write `model_card_text` to out_path (whole); returns it."""
    from captioner.files import atomic_write

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_path, model_card_text(model_dir, repo_id=repo_id, scores=scores, train_config=train_config))


def push_to_hub(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                scores: dict | str | Path | None = None, train_config: dict | str | Path | None = None,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Upload a saved captioner (a directory, or a run directory with best/ or last/) to Hub repo `repo_id`:
    config.json, model.safetensors, the tokenizer files and a generated model card, in one commit (to
    branch `revision`, created if needed). scores / train_config: default the run's own files (`run_files`).
    Returns the commit URL. Failures are one HubError line."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from captioner.errors import HubError

    model_dir = model_dir_of(run_dir)  # the card reads (and so checks) its config.json
    card = model_card_text(model_dir, repo_id=repo_id, scores=scores, train_config=train_config)
    files = [f for f in MODEL_FILES if (model_dir / f).is_file()]
    if "model.safetensors" not in files:
        from captioner.errors import CheckpointError

        raise CheckpointError(f"{model_dir / 'model.safetensors'}: missing")
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(model_dir / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload captioner from {model_dir.name}")
    except Exception as e:  # HTTP, authentication and validation errors of every kind
        raise HubError(f"could not push {model_dir} to Hub repo {repo_id}: {type(e).__name__}: {_brief(e)}") from None
    logger.info("pushed %s to %s", model_dir, info.commit_url)
    return info.commit_url
