import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# OMP_NUM_THREADS where set (a shared, busy machine runs far faster on one thread than oversubscribed on two)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def world_pipe():
    """The shipped world pipeline, loaded once."""
    from erasekit.models import load_pipeline

    return load_pipeline(None, device="cpu")


@pytest.fixture(scope="session")
def classifier():
    from erasekit.world.classifier import load_classifier

    return load_classifier()
