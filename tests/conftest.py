import os

import pytest
import torch

# No network here: make hub lookups fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    """Tests run on the CPU on every machine, so that their bit-for-bit comparisons compare CPU
    runs: CUDA is hidden from this process and from the processes the tests start. Tests about
    CUDA are marked ``cuda`` and run on their own with ``pytest -m cuda``."""
    config.addinivalue_line("markers", "cuda: needs a CUDA device; run alone with -m cuda")
    if config.option.markexpr != "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.cuda.is_available = lambda: False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with -m cuda on a machine with one)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A converted timm ``test_resnet`` folder (64x64, 4 classes) for tests that fine-tune or write
    into runs; one for the whole session, so tests read it and never change it. timm's small test
    ResNet (0.4M parameters) trains about five times as fast here as resnet18."""
    import flexsurgeon

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("convert") / "test_resnet"
    flexsurgeon.save(flexsurgeon.convert("test_resnet", img_size=64, num_classes=4), directory)
    return directory


@pytest.fixture
def x64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def compiled_matches_eager():
    """A check that ``torch.compile(net, fullgraph=True)`` gives ``net``'s outputs in eval mode and
    its parameter gradients in train mode; returns the compiled module."""

    def check(net, x, backend="inductor"):
        compiled = torch.compile(net, fullgraph=True, backend=backend)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-6)
        net.train()
        eager = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
        got = torch.autograd.grad(compiled(x).square().sum(), list(net.parameters()))
        for g, e in zip(got, eager):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        return compiled

    return check
