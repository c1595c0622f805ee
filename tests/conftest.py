import os

import pytest
import torch

# Tests never reach a model hub: every model is built from a config or saved into a temp folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# One intra-op thread: the tests' tensors are tiny, where a second thread costs more in hand-offs
# than it saves (measured 10-25x slower with 2 threads on a busy 2-core machine). Tests that check
# the kernels' multi-threaded paths set the thread count themselves.
torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a whole module, restored afterwards (for modules whose tensors are
    tiny even when another test in the session raised the thread count): on a loaded shared machine
    two threads waiting on each other make such tests many times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
