"""Shared fixtures (a seed for every test, tiny Hugging Face models) and the ``slow`` marker of everything under
``tests/integration`` (multi-process runs, the launcher CLI, benchmarks)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.models import TINY_MODELS, TINY_VOCAB  # noqa: E402

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_causal_lm(request):
    return TINY_MODELS[request.param]()


@pytest.fixture
def token_ids():
    return torch.randint(0, TINY_VOCAB, (2, 11))
