pytest_plugins = ["tests.slurm.fixture"]  # the private SLURM cluster fixture

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the long variants marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow variant: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
                    "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def launch_environment_untouched():
    """A test (or the code under it) that leaves e.g. RANK=1 in this process's environment makes every
    later subprocess think it is rank 1 of an external launch: it logs nothing and its DDP hangs."""
    import os

    before = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    yield
    after = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    assert after == before, f"the test changed the launch environment: {before} -> {after}"
