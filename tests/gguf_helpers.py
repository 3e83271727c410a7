"""Shared GGUF test helpers: tiny models in the shapes an export takes, and llama.cpp as the reference reader."""

import numpy as np
import torch
from references import require
from torch import nn

from loraforge.adapters import AdapterSpec, add_adapter
from loraforge.models import tiny_model
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import quantize_q4_0, quantize_q4_1, quantize_q8_0
from loraforge.quant.intk import quantize_intk
from loraforge.utils import llama_cpp_reference

QUANTIZERS = {
    "q4_1": quantize_q4_1,
    "q4_0": quantize_q4_0,
    "q8_0": quantize_q8_0,
    "int4-g32": lambda w: quantize_intk(w, 4, 32),
    "int2-g64": lambda w: quantize_intk(w, 2, 64),
}


def model_on(base: str | None, method: str | None = None, family="tiny-llama", **overrides):
    """A tiny model with ``base``-quantized linears (dense for None), Q8_0-representable embeddings (so a
    Q8_0 export of them is exact), random biases (Qwen2's q/k/v; transformers initialises them to zero, which
    would hide a lost bias), and an adapter of ``method`` with random A and B; ``overrides`` change config
    fields."""
    model = tiny_model(family, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight.copy_(quantize_q8_0(emb.weight).dequantize())
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, model.config.initializer_range, generator=generator)
    head = model.get_output_embeddings()
    if base is not None:
        for path, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and module is not head:
                model.set_submodule(path, QuantLinear(QUANTIZERS[base](module.weight), module.bias, torch.float32))
    if method is not None:
        torch.manual_seed(0)
        add_adapter(model, AdapterSpec(method=method, r=4, alpha=8, init="none"))
    return model


def llama_cpp(gguf_path, n_ctx: int = 256, **options):
    """llama.cpp (llama-cpp-python) with ``gguf_path`` loaded, keeping the logits of every position; ``options``
    go to ``Llama`` (``lora_path``). Its weights stay in plain CPU buffers on every CPU (``llama_cpp_reference``:
    ggml's AMX path segfaults on Sapphire Rapids), so the reference is ggml's plain kernels everywhere."""
    require("llama_cpp")
    return llama_cpp_reference.load(gguf_path, plain_buffers=True, n_ctx=n_ctx, n_threads=1, logits_all=True,
                                    verbose=False, **options)


def llama_cpp_logits(gguf_path, ids: list[int]) -> torch.Tensor:
    """The fp32 logits ``(len(ids), vocab)`` llama.cpp computes for ``ids`` from ``gguf_path``."""
    llm = llama_cpp(gguf_path)
    llm.eval(ids)
    return torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(Pearson correlation, max |difference|) over all elements of two same-shaped logit tensors."""
    corr = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1].item()
    return corr, (ours - theirs).abs().max().item()
