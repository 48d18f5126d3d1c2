"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tiny models are many small ops: one intra-op thread is faster than two on the 2-core CI box
    # (and much faster when the cores are shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
