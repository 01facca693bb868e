"""Errors: every error captioner raises for bad input, configuration or environment derives from
`CaptionerError`, so the CLI catches the base once and prints its one-line message.

Each subclass also derives from the builtin it refines (ValueError, RuntimeError, OSError), so code
that caught those keeps working. Messages name the file, row or field and the reason in one line; they
never name CLI flags (the CLI adds flag hints where it knows them).
"""

from __future__ import annotations


MAX_DETAIL = 200  # characters of a library's message kept in a reason


def one_line(e: BaseException | str) -> str:
    """A message (or exception) as one line of at most MAX_DETAIL characters, for "NAME: REASON" errors."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 3] + "..."


class CaptionerError(Exception):
    """Base of all captioner errors: a one-line message for the user, never a traceback."""

    exit_code = 2  # the CLI's exit status for this kind of error


class ConfigError(CaptionerError, ValueError):
    """A configuration file or value is malformed (unknown key, wrong type, bad value)."""


class DataError(CaptionerError, ValueError):
    """A caption set, table, reference or prediction file cannot be used."""


class InputError(CaptionerError, ValueError):
    """One input (image or sound) cannot be read: "NAME: REASON"."""


class ImageError(InputError):
    """One image could not be read; the message names the file and the reason ("PATH: REASON", one line)."""


class AudioError(InputError):
    """One audio file could not be read; the message names the file and the reason ("PATH: REASON", one line)."""


class SourceError(CaptionerError, ValueError):
    """An input spec for sharded captioning cannot be used (no match, unreadable shard, bad column)."""


class ModelLoadError(CaptionerError, RuntimeError):
    """A pretrained part (open_clip tower, LM, tokenizer, audio model) could not be loaded."""


class CheckpointError(CaptionerError, RuntimeError):
    """A captioner directory is missing, incomplete or malformed."""


class ModalityError(CaptionerError, ValueError):
    """An input lacks a modality the model needs, or has one it was not trained on."""


class MetricsError(CaptionerError, ValueError):
    """Predictions and references do not match, or a scorer is unavailable."""


class FileSystemError(CaptionerError, OSError):
    """An operating-system error (missing folder, permission, disk full) while reading or writing our files."""

    exit_code = 3


class TrainingError(CaptionerError, RuntimeError):
    """Training cannot go on (the loss stopped being finite); the message says what was saved."""


class OutputError(CaptionerError, ValueError):
    """A result or errors file cannot be written: it exists, is not one of ours, is an input, or is in use."""


class HubError(CaptionerError, RuntimeError):
    """An upload to the Hugging Face Hub failed (authentication, network, repository)."""
