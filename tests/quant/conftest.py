import pytest
import torch


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes torch.compiles its odd-shape dequantization; eager gives the same numbers in far less time.

    Through dynamo's own ``config.patch``, which restores the option. ``monkeypatch.setattr`` on the config
    module breaks from the second test on (torch 2.13, pytest 9): the module proxies its options rather than
    holding them in ``__dict__``, so the undo deletes ``disable`` and later tests find no such option.
    """
    with torch._dynamo.config.patch(disable=True):
        yield
