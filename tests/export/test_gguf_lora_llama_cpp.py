"""llama.cpp applies our GGUF LoRA files as loraforge applies the adapter: on tiny Llama, Qwen2 and Mistral
bases, for every method that folds to a low-rank pair, and on the default model.

The yardstick is the base alone: llama.cpp and loraforge agree on the base's logits only up to llama.cpp's
own arithmetic (fp16 / 8-bit activations inside its matmuls). With the adapter they must agree about as
well, and the adapter's effect (adapted minus base logits) must point the same way (cosine >= 0.98)."""

import numpy as np
import pytest
import torch
from gguf_helpers import agreement, llama_cpp, model_on
from torch import nn

from loraforge.adapters import (
    AdapterSpec,
    add_adapter,
    load_adapter,
    mark_only_adapters_trainable,
    read_adapter_dir,
    save_adapter,
)
from loraforge.adapters.adalora import AdaLoraOptions
from loraforge.export.gguf_lora import write_gguf_lora
from loraforge.export.gguf_writer import write_gguf
from loraforge.models import tiny_tokenizer

TEXT = "Name three primary colours, s'il vous plaît. Thanks!"

ADAPTERS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8},
    "rslora-r16": {"method": "lora", "r": 16, "alpha": 8, "use_rslora": True},
    "patterns": {"method": "lora", "r": 8, "alpha": 16, "rank_pattern": {"up_proj": 4, "k_proj": 2},
                     "alpha_pattern": {"down_proj": 7, "v_proj": 3}},
    "rslora-patterns": {"method": "lora", "r": 8, "alpha": 16, "use_rslora": True, "rank_pattern": {"o_proj": 32}},
    "pissa": {"method": "lora", "r": 4, "alpha": 4, "init": "pissa"},
    "adalora": {"method": "adalora", "alpha": 0.05, "init": "none",
                    "options": AdaLoraOptions(init_r=6, target_r=3, total_step=10)},
    "vera": {"method": "vera", "r": 16, "init": "none"},
    "qalora": {"method": "qalora", "r": 4, "alpha": 8, "init": "none"},
}
"""Adapter settings, each trained a few steps so that every tensor moves off its init. AdaLoRA's and VeRA's
default inits leave the update at zero, so they start from random tensors (AdaLoRA's at a small alpha: its
random update would otherwise outweigh the base by 100x); QA-LoRA's too, so that its update stands well
above llama.cpp's Q4_1 noise."""

INIT_RANGE = 0.1
"""As in test_gguf_llama_cpp.py: large enough that wrong Q/K rows show in the logits."""

AGREEMENT_MARGIN = 2.5
"""The adapted logits may differ between the two by at most this times the base's max |difference|: the
adapter adds a few roundings of the same kind per layer. Measured ratios: 0.5-1.5 (2.2 for an AdaLoRA
update 4x larger than the one tested)."""


def fp16_base(family: str, base: str | None) -> nn.Module:
    """A tiny model whose GGUF export is lossless: GGUF blocks as they are (``base``), or dense weights that
    fp16 holds exactly (for an F16 export)."""
    model = model_on(base, None, family, initializer_range=INIT_RANGE)
    if base is None:
        with torch.no_grad():
            for tensor in model.parameters():
                if tensor.dim() == 2:
                    tensor.copy_(tensor.half().float())
    return model.eval()


def trained_adapter(make_base, folder, fields: dict, seed: int = 0):
    """A saved adapter whose tensors moved off their init (3 SGD steps)."""
    model = make_base()
    spec = AdapterSpec(**fields)
    torch.manual_seed(seed)
    add_adapter(model, spec)
    mark_only_adapters_trainable(model)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(seed))
    lr = 0.2 if spec.init == "none" else 0.5  # from random tensors, smaller steps keep the update moderate
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_adapter(model, folder, spec)


def llama_cpp_logits(base_gguf, ids, lora=None) -> torch.Tensor:
    llm = llama_cpp(base_gguf, **({"lora_path": str(lora)} if lora else {}))
    llm.eval(ids)
    return torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def assert_llama_cpp_applies(make_base, adapter_dir, base_gguf, lora_gguf, ids, margin=AGREEMENT_MARGIN):
    """The comparison of the module docstring; returns (base max |Δ|, adapted max |Δ|, delta cosine)."""
    base_ours = logits(make_base(), ids)
    adapted = make_base()
    load_adapter(adapted, adapter_dir)
    adapted_ours = logits(adapted, ids)
    base_theirs = llama_cpp_logits(base_gguf, ids)
    adapted_theirs = llama_cpp_logits(base_gguf, ids, lora_gguf)
    _, base_diff = agreement(base_ours, base_theirs)
    corr, adapted_diff = agreement(adapted_ours, adapted_theirs)
    delta_ours, delta_theirs = (adapted_ours - base_ours).flatten(), (adapted_theirs - base_theirs).flatten()
    assert delta_ours.norm() > 10 * base_diff, "the adapter must change the logits well beyond the base's noise"
    cosine = torch.nn.functional.cosine_similarity(delta_ours, delta_theirs, dim=0).item()
    assert cosine >= 0.98, (cosine, base_diff, adapted_diff)
    assert adapted_diff <= margin * base_diff, (base_diff, adapted_diff, corr)
    return base_diff, adapted_diff, cosine


@pytest.fixture(scope="module")
def ids():
    return tiny_tokenizer()(TEXT)["input_ids"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_llama_cpp_applies_every_low_rank_method(family, adapter, ids, tmp_path):
    base = "q4_1" if adapter == "qalora" else None
    make_base = lambda: fp16_base(family, base)
    folder = trained_adapter(make_base, tmp_path / "adapter", ADAPTERS[adapter])
    write_gguf(make_base(), tiny_tokenizer(), tmp_path / "base.gguf", base or "f16")
    config, tensors = read_adapter_dir(folder)
    report = write_gguf_lora(make_base(), config, tensors, folder, tmp_path / "lora.gguf", "f32")
    assert {t.type for t in report.tensors} == {"F32"}
    assert_llama_cpp_applies(make_base, folder, tmp_path / "base.gguf", tmp_path / "lora.gguf", ids)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_llama_cpp_applies_rounded_lora_tensors(gguf_type, ids, tmp_path):
    """F16 and Q8_0 LoRA tensors (rank 32, so lora_b's rows are whole Q8_0 blocks too)."""
    make_base = lambda: fp16_base("tiny-llama", None)
    folder = trained_adapter(make_base, tmp_path / "adapter", {"method": "lora", "r": 32, "alpha": 16})
    write_gguf(make_base(), tiny_tokenizer(), tmp_path / "base.gguf", "f16")
    config, tensors = read_adapter_dir(folder)
    report = write_gguf_lora(make_base(), config, tensors, folder, tmp_path / "lora.gguf", gguf_type)
    assert {t.type for t in report.tensors} == {gguf_type.upper()}
    assert_llama_cpp_applies(make_base, folder, tmp_path / "base.gguf", tmp_path / "lora.gguf", ids)


@pytest.mark.slow
def test_llama_cpp_applies_an_adapter_to_the_default_model(tmp_path):
    """The default model's own Q4_1 GGUF as the base: only the adapter file is new."""
    from loraforge.models.gguf_native import load_gguf_native
    from loraforge.models.sources import default_gguf_path

    base_gguf = default_gguf_path()
    make_base = lambda: load_gguf_native(base_gguf)[0]
    model, tokenizer = load_gguf_native(base_gguf)
    spec = AdapterSpec(method="lora", r=8, alpha=8, init="none", use_rslora=True)
    torch.manual_seed(0)
    add_adapter(model, spec)
    folder = save_adapter(model, tmp_path / "adapter", spec)
    config, tensors = read_adapter_dir(folder)
    write_gguf_lora(model, config, tensors, folder, tmp_path / "lora.gguf", "f16")
    ids = tokenizer(TEXT)["input_ids"]
    assert_llama_cpp_applies(make_base, folder, base_gguf, tmp_path / "lora.gguf", ids)
