"""Shared fixtures and marker handling for the test suite."""

import os
import socket

import pytest
import torch

from tests.key_lists import VOCAB_FILE


def pytest_collection_modifyitems(config, items):
    # GPU_TESTS_DEVICE=cpu: run the gpu tests on the CPU, to check them without a GPU
    if torch.cuda.is_available() or os.environ.get("GPU_TESTS_DEVICE"):
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    """The real bert-base-uncased tokenizer, built offline from the shipped vocabulary."""
    from transformers import BertTokenizer

    # transformers 5 silently ignores `vocab_file=` (it lands in **kwargs and a 5-token vocabulary
    # is built instead); the vocabulary goes in as `vocab=`.
    return BertTokenizer(vocab=str(VOCAB_FILE), do_lower_case=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(handlers, client) for the app launched in this process on a free port: its
    ui.handlers.GroundedSamApp, so tests can read the pipeline's counters and change the
    handlers' settings."""
    tmp = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
        patch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp / "examples"))
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        import app
        from segmentation.models import ModelChoice
        from ui.handlers import GroundedSamApp

        config = app.AppConfig(
            models=ModelChoice("swint_ogc", "vit_b", "cpu", offline=True),
            host="127.0.0.1",
            port=free_port(),
        )
        handlers = GroundedSamApp(config.models)
        demo = app.build_demo(config, handlers)
        _, url, _ = app.launch(demo, config, prevent_thread_lock=True, quiet=True)
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
        try:
            yield handlers, client
        finally:
            client.close()
            demo.close()
