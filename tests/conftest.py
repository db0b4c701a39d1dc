import os

import pytest
import torch

# No network here: make hub lookups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def x64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
