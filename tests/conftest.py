import os
import socket
import sys

import pytest
import torch

# Without a GPU the Triton kernels can only run in Triton's CPU interpreter, which must be
# switched on before triton is first imported (by any test module, or by a library such as
# lightning). So the README's plain `python -m pytest tests` tests them on any machine.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where torchvision is installed, make it importable before any test (or transformers) imports it.
from real_models import importable_torchvision  # noqa: E402

importable_torchvision()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes tens of seconds (CI runs it)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_seed():
    """A new seed every run (random inputs must differ run to run); shown on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_group():
    """A one-process gloo group for the test (distributed code paths checked in this process)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
