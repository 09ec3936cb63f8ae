"""Fetching weights and tokenizer files from the Hugging Face Hub (cached, with progress).

Every lookup tries the local cache first. When a file is not cached and the Hub cannot be reached
(`HF_HUB_OFFLINE=1`, or no route to the endpoint), it fails at once with a message naming the file
and how to supply it, instead of after huggingface_hub's minute of retries.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal, overload
from urllib.parse import urlparse

from grounding.config import DETECTOR_PRESETS
from grounding.config import OFFICIAL_REPO as OFFICIAL_REPO

# Derived from the one table of presets, `grounding.config.DETECTOR_PRESETS`.
OFFICIAL_FILES = {name: preset.official_file for name, preset in DETECTOR_PRESETS.items()}
TEXT_ENCODER_REPO = "bert-base-uncased"
TEXT_ENCODER_FILES = ("config.json", "vocab.txt", "tokenizer_config.json")
CHECKPOINT_ENV = "GROUNDING_DINO_CHECKPOINT"
TEXT_ENCODER_ENV = "GROUNDING_DINO_TEXT_ENCODER"


class OfflineError(FileNotFoundError):
    """A needed file is neither cached nor downloadable."""


@overload
def hub_file(
    repo_id: str, filename: str, *, how_to_supply: str, optional: Literal[False] = False
) -> Path: ...


@overload
def hub_file(repo_id: str, filename: str, *, how_to_supply: str, optional: bool) -> Path | None: ...


def hub_file(
    repo_id: str,
    filename: str,
    *,
    how_to_supply: str,
    optional: bool = False,
) -> Path | None:
    """The local path of `repo_id/filename`, from the cache or downloaded into it.

    Args:
        how_to_supply: the sentence that tells the user how to provide the file themselves.
        optional: return None instead of raising when the repository has no such file.

    Raises:
        OfflineError: not cached and the Hub is unreachable.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if not hub_reachable():
        if optional:
            return None
        raise OfflineError(
            f"{filename} from the Hugging Face Hub repository {repo_id} is not in the local cache "
            f"and the Hub cannot be reached. {how_to_supply}"
        )
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError as error:
        raise OfflineError(
            f"could not download {filename} from {repo_id}: {error}. {how_to_supply}"
        ) from error
    except EntryNotFoundError:
        if optional:
            return None
        raise


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the Hub endpoint does not accept a connection."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def official_checkpoint(preset: str) -> Path:
    """The official `.pth` for a preset: `$GROUNDING_DINO_CHECKPOINT`, else the Hub."""
    if preset not in DETECTOR_PRESETS:
        raise ValueError(
            f"no official checkpoint for config {preset!r}; "
            f"choose one of {sorted(DETECTOR_PRESETS)} or pass checkpoint="
        )
    if os.environ.get(CHECKPOINT_ENV):
        return Path(os.environ[CHECKPOINT_ENV])
    filename, repo = DETECTOR_PRESETS[preset].official_file, DETECTOR_PRESETS[preset].hub_repo
    return hub_file(
        repo,
        filename,
        how_to_supply=(
            f"Download {filename} from https://huggingface.co/{repo} on a connected "
            f"machine and pass its path as checkpoint= (the app and CLI: --detector PATH), or set "
            f"{CHECKPOINT_ENV}."
        ),
    )


TRANSFORMERS_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
)


def transformers_checkpoint_dir(repo_id: str) -> Path:
    """A transformers-format Grounding DINO repository (e.g. `IDEA-Research/grounding-dino-tiny`)
    downloaded into the Hub cache; returns its local directory."""
    how = (
        f"Download {repo_id} on a connected machine (config.json, model.safetensors and the "
        "tokenizer files) and pass the directory as checkpoint= (the app and CLI: "
        "--detector PATH)."
    )
    paths = [
        hub_file(
            repo_id,
            name,
            how_to_supply=how,
            optional=name not in ("config.json", "model.safetensors"),
        )
        for name in TRANSFORMERS_FILES
    ]
    config = paths[0]
    assert config is not None  # config.json is not optional: hub_file raised instead
    return config.parent


def text_encoder_dir(text_encoder: str | os.PathLike | None) -> Path:
    """A directory with BERT's `config.json` and `vocab.txt`.

    `text_encoder` is a local directory, a Hub id, or None for `$GROUNDING_DINO_TEXT_ENCODER`
    or else `bert-base-uncased`.
    """
    source = text_encoder or os.environ.get(TEXT_ENCODER_ENV) or TEXT_ENCODER_REPO
    if Path(source).is_dir():
        directory = Path(source)
        if not any((directory / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
            raise FileNotFoundError(
                f"{directory} has no vocab.txt or tokenizer.json (the BERT WordPiece vocabulary)"
            )
        return directory
    how = (
        f"Put config.json and vocab.txt of {source} in a directory and pass it as "
        f"text_encoder=, or set {TEXT_ENCODER_ENV}."
    )
    paths = [
        hub_file(str(source), name, how_to_supply=how, optional=name == "tokenizer_config.json")
        for name in TEXT_ENCODER_FILES
    ]
    vocab = paths[1]
    assert vocab is not None  # vocab.txt is not optional: hub_file raised instead
    return vocab.parent


# A Hub repository id: "owner/name", each part letters, digits, "_", "-" and ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".json")


def looks_like_path(text: str | os.PathLike) -> bool:
    """Whether `text` can only mean a local file or folder: "./x", "~/x", "a/b/c", "x.pth"."""
    text = str(text)
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or text.lower().endswith(_WEIGHT_SUFFIXES)
    )


def is_hub_id(checkpoint: str | os.PathLike) -> bool:
    """Whether `checkpoint` names a Hub repository ("IDEA-Research/grounding-dino-tiny") rather
    than a local path. Not when the path exists, when it can only be a path (`looks_like_path`),
    or when its first part is a local folder ("runs/last" with a "runs" folder here: a mistyped
    path, reported as a missing file instead of a Hub lookup)."""
    text = str(checkpoint)
    return (
        _HUB_ID.fullmatch(text) is not None
        and not looks_like_path(text)
        and ".." not in text
        and "--" not in text
        and not Path(text).exists()
        and not Path(text.split("/")[0]).is_dir()
    )
