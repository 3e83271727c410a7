"""Tiny models and real PEFT adapters (random A and B) shared by the serving tests."""

import pytest
import torch
from references import require_built

from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.native import DECODE_OPS
from loraforge.serve import runner

from .helpers import save_peft_adapter

ADAPTER_CONFIGS = {
    # rank 8 on attention q/v only
    "r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    # rank 16 on every projection, rsLoRA scaling
    "r16": dict(r=16, lora_alpha=8, use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # rank 64 on o/down and rank 4 on up (rank_pattern), with a per-module alpha (alpha_pattern)
    "r64": dict(r=64, lora_alpha=32, target_modules=["o_proj", "down_proj", "up_proj"],
                rank_pattern={"up_proj": 4}, alpha_pattern={"down_proj": 7}),
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads' hand-offs cost
    more than the ops (10x per step, measured); the serving tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llama():
    return tiny_model("tiny-llama")


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """name -> directory of a PEFT adapter for tiny-llama, ranks 8, 16 and 64."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_peft_adapter(root / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTER_CONFIGS.items())}



@pytest.fixture(params=["native", "torch"])
def decode_ops(request, monkeypatch):
    """Run the test with the runner's native decode ops (``native/decode_ops.cpp``), then with torch's ops alone. Without
    the native library the first skips, and fails in CI."""
    if request.param == "torch":
        monkeypatch.setattr(runner, "_native_ops", lambda h: None)
    else:
        require_built(DECODE_OPS)
    return request.param
