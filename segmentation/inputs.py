"""Checks of what a served app receives: uploaded image files, prompts and thresholds.

No web framework here: a bad input raises `InputError`, a ValueError whose message is meant for
the user and whose `title` names the problem; the app (`ui/`) shows both. Messages never contain
a server path or an OS error text, and markup in what the user sent is escaped.
"""

from __future__ import annotations

import html
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from grounding.predictor import has_words

MAX_PROMPT_CHARS = 2000
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # also the server's max_file_size (app.py)
NOT_UPLOADED = (
    "The image must be uploaded (through the page, or with gradio_client's "
    "handle_file); server paths are not accepted."
)


class InputError(ValueError):
    """An input the app refuses, said for the user (not a fault of the server).

    Args:
        message: what is wrong and what to do, safe to show (no paths, markup escaped).
        title: a few words naming the problem ("Empty prompt").
    """

    def __init__(self, message: str, title: str = "Error") -> None:
        super().__init__(message)
        self.title = title


def upload_path(value) -> str | None:
    """The server-side path of an image input: a FileData dict (the app's events skip Gradio's
    preprocessing, so it never opens the file itself) or a path string (examples)."""
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, str) and value else None


def upload_name(value) -> str:
    """The uploaded file's original name, made safe for download names ("image" if unknown)."""
    name = value.get("orig_name") if isinstance(value, dict) else value
    name = Path(name).name if isinstance(name, str) and name else "image"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-80:].lstrip(".") or "image"


def text_for_message(value, limit: int = 200) -> str:
    """`value` as plain text for a message: HTML-escaped and cut to `limit` characters (toasts
    and Markdown render markup; prompts and errors may hold some)."""
    return html.escape(str(value)[:limit], quote=False)


def check_prompt(prompt, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """`prompt`, if it names something and has at most `max_chars` characters."""
    if not has_words(prompt):
        raise InputError(
            "Type what to find, for example 'a cat . a remote control .'", title="Empty prompt"
        )
    if len(prompt) > max_chars:
        raise InputError(
            f"The prompt has {len(prompt)} characters; the limit is {max_chars}.",
            title="Prompt too long",
        )
    return prompt


def check_threshold(name: str, value) -> float:
    """`value` as a float, if it is a real number in [0, 1]: not a string, not `true`, not NaN."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 <= float(value) <= 1.0
    ):
        shown = text_for_message(repr(value), 40)
        raise InputError(
            f"{name} must be a number between 0 and 1, got {shown}", title="Bad threshold"
        )
    return float(value)


def read_upload(
    path: str, roots: Iterable[str | os.PathLike], max_bytes: int = MAX_UPLOAD_BYTES
) -> bytes:
    """The bytes of an image input, only when it is a regular file inside one of `roots` (the
    app's: Gradio's upload folder, which holds uploads and cached examples, and the example
    images).

    Anything else (a server path sent through the API, a directory, a device, a FIFO, a missing
    file, a link leading out of those folders) gets one message that says nothing about the path,
    without opening it; no OS error text reaches the caller.
    """
    real = os.path.realpath(path)
    if not any(os.path.commonpath((real, root)) == root for root in map(os.path.realpath, roots)):
        raise InputError(NOT_UPLOADED, title="Image not uploaded")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        descriptor = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise InputError(NOT_UPLOADED, title="Image not uploaded") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(NOT_UPLOADED, title="Image not uploaded")
        if info.st_size > max_bytes:
            raise InputError(
                f"The file has {info.st_size / 2**20:.0f} MB; the limit is "
                f"{max_bytes // 2**20} MB.",
                title="File too large",
            )
        try:
            return handle.read(max_bytes + 1)
        except OSError:
            raise InputError(NOT_UPLOADED, title="Image not uploaded") from None


def decode_image(path: str | None, roots: Iterable[str | os.PathLike]) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an uploaded file (EXIF-rotated, any mode, size-capped), read
    only from inside `roots` (`read_upload`)."""
    from segmentation.images import load_image

    if path is None:
        raise InputError("Upload an image first (or pick an example).", title="No image")
    data = read_upload(path, roots)
    try:  # from bytes, so messages say "the uploaded file", not a server path
        return np.asarray(load_image(data))
    except (OSError, ValueError) as error:
        raise InputError(
            f"This file cannot be used as an image: {text_for_message(error)}",
            title="Unreadable image",
        ) from None
