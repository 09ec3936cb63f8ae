"""Downloads with the network replaced by local files: cache, download path, offline errors."""

import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from grounding import hub
from tests.helpers import COMMIT
from tests.key_lists import VOCAB_FILE


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out exactly as huggingface_hub caches a download of `repo_id` at main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "hub"
    directory.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(directory))
    monkeypatch.delenv(hub.CHECKPOINT_ENV, raising=False)
    monkeypatch.delenv(hub.TEXT_ENCODER_ENV, raising=False)
    return directory


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_cached_official_checkpoint_is_used_without_network(cache, offline):
    put_in_cache(cache, hub.OFFICIAL_REPO, {"groundingdino_swint_ogc.pth": b"weights"})
    path = hub.official_checkpoint("swint_ogc")
    assert path.read_bytes() == b"weights"


def test_offline_and_not_cached_fails_at_once_naming_file_and_remedy(cache, offline):
    start = time.perf_counter()
    with pytest.raises(hub.OfflineError) as error:
        hub.official_checkpoint("swinb_cogcoor")
    assert time.perf_counter() - start < 2
    message = str(error.value)
    assert "groundingdino_swinb_cogcoor.pth" in message
    assert hub.OFFICIAL_REPO in message and hub.CHECKPOINT_ENV in message


def test_download_path_fetches_into_the_cache(cache, monkeypatch, tmp_path):
    source = tmp_path / "remote.pth"
    source.write_bytes(b"downloaded")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        put_in_cache(cache, repo_id, {filename: source.read_bytes()})
        return str(
            cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT / filename
        )

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub.official_checkpoint("swint_ogc").read_bytes() == b"downloaded"
    assert hub.official_checkpoint("swint_ogc").read_bytes() == b"downloaded"
    assert calls == [(hub.OFFICIAL_REPO, "groundingdino_swint_ogc.pth")]  # second call: cache


def test_environment_variable_overrides_the_hub(cache, offline, monkeypatch, tmp_path):
    local = tmp_path / "mine.pth"
    monkeypatch.setenv(hub.CHECKPOINT_ENV, str(local))
    assert hub.official_checkpoint("swint_ogc") == local


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="no official checkpoint"):
        hub.official_checkpoint("swin_l")


def test_text_encoder_from_local_directory_and_from_cache(cache, offline, tmp_path):
    local = tmp_path / "bert"
    local.mkdir()
    shutil.copy(VOCAB_FILE, local / "vocab.txt")
    assert hub.text_encoder_dir(local) == local
    put_in_cache(
        cache, "bert-base-uncased", {"config.json": b"{}", "vocab.txt": VOCAB_FILE.read_bytes()}
    )
    directory = hub.text_encoder_dir(None)
    assert (directory / "vocab.txt").read_bytes() == VOCAB_FILE.read_bytes()


def test_text_encoder_offline_error_names_the_remedy(cache, offline):
    with pytest.raises(hub.OfflineError) as error:
        hub.text_encoder_dir("bert-base-uncased")
    assert "config.json" in str(error.value) and hub.TEXT_ENCODER_ENV in str(error.value)


def test_local_directory_without_vocabulary_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        hub.text_encoder_dir(tmp_path)


def test_transformers_repository_from_the_cache(cache, offline):
    put_in_cache(
        cache,
        "IDEA-Research/grounding-dino-tiny",
        {"config.json": b"{}", "model.safetensors": b"x", "vocab.txt": b"[PAD]"},
    )
    directory = hub.transformers_checkpoint_dir("IDEA-Research/grounding-dino-tiny")
    assert (directory / "model.safetensors").read_bytes() == b"x"
    with pytest.raises(hub.OfflineError, match="grounding-dino-base"):
        hub.transformers_checkpoint_dir("IDEA-Research/grounding-dino-base")
