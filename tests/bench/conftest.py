import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on two threads stall badly when other processes busy the cores; one is plenty."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
