import os

import pytest
import torch

# two cores: keep intra-op threads at 2 and make every test deterministic
torch.set_num_threads(min(2, os.cpu_count() or 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
