"""Shared fixtures and marker handling for the test suite."""

from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"
VOCAB_FILE = DATA_DIR / "bert-base-uncased-vocab.txt"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
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
