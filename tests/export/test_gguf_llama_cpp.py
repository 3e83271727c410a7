"""llama.cpp reads our GGUF exports as we compute them: the same token ids, and the same logits for each
export type and architecture, within what the formats' rounding allows. Tiny models keep each case under
a second."""

import pytest
import torch
from gguf_helpers import agreement, llama_cpp, llama_cpp_logits, model_on
from references import require

from loraforge.adapters import merge_adapters
from loraforge.export.gguf_writer import write_gguf
from loraforge.models import tiny_tokenizer
from loraforge.models.gguf_native import load_gguf_native
from loraforge.models.tiny import SPECIAL_TOKENS
from loraforge.utils import llama_cpp_reference

PROMPT = [{"role": "user", "content": "Name three primary colours, s'il vous plaît.\n  Thanks!"}]

EXACT_EXPORTS = {"f16": (None, "lora"), "q8_0": ("q8_0", None), "q4_1": ("q4_1", "qalora")}
"""Export type -> (base quantization, adapter): Q8_0 and Q4_1 blocks are written as the model holds them
(QA-LoRA folds into Q4_1 exactly), so llama.cpp's own arithmetic is all that differs; F16 also rounds
the merged dense weights to fp16."""

RELATIVE_ERROR = {"f16": 5e-3, "q8_0": 5e-2, "q4_1": 5e-2}
"""Allowed error, relative to the spread of the logits (correlation) and to the largest logit (max |Δ|).

- F16: llama.cpp rounds the weights, each matmul's input and the KV cache to fp16 (RMS error 2⁻¹¹/√3 ≈ 2.8e-4
  each); about 34 roundings per token in two layers add in quadrature to √34 · 2.8e-4 ≈ 1.7e-3 → 3× that.
- Q8_0, Q4_1: llama.cpp rounds each quantized matmul's input to 8 bits per block of 32 (Q8_0, or Q8_1 for
  Q4_1), an RMS error of (max/127)/√12 ≈ 0.6% of the block's RMS when its max is 2.5× its RMS; 9 roundings
  per token (q/k/v, o, gate/up and down inputs in two layers, and the head) give √9 · 0.6% ≈ 1.7% → 3× that.

The factor 3 is margin for the growth of errors through the network, which the quadrature sum leaves out.
Measured: F16 corr ≥ 0.999999, max |Δ| ≤ 2.1e-3 of the largest logit; Q8_0 and Q4_1 corr ≥ 0.99987,
max |Δ| ≤ 2.3e-2.
"""

INIT_RANGE = 0.1
"""At the default 0.02 a tiny model's attention is nearly uniform, so wrong Q/K rows barely show in the logits
(a Q8_0 export without llama.cpp's RoPE permutation still correlates 0.99994 and passes); at 0.1 it drops to
0.84."""


@pytest.fixture(scope="module")
def prompt_ids():
    tokenizer = tiny_tokenizer()
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("metadata", ["converted", "copied"])
def test_llama_cpp_tokenizes_like_our_tokenizer(metadata, tmp_path):
    """From the Hugging Face tokenizer, and copied from the GGUF a natively loaded model came from (an empty
    merges array must keep its item type)."""
    tokenizer = tiny_tokenizer()
    write_gguf(model_on(None, family="tiny-llama"), tokenizer, tmp_path / "m.gguf", "f16")
    if metadata == "copied":
        native, _ = load_gguf_native(tmp_path / "m.gguf")
        write_gguf(native, None, tmp_path / "m.gguf", "f16")
    llm = llama_cpp(tmp_path / "m.gguf")
    chat = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    text = chat + "<|endoftext|> 1+1=2\t€"
    ours = tokenizer(text)["input_ids"]
    assert set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)) <= set(ours)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours
    assert llm.token_eos() == tokenizer.eos_token_id


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
@pytest.mark.parametrize("gguf_type", list(EXACT_EXPORTS))
def test_llama_cpp_logits_match_the_merged_model(family, gguf_type, prompt_ids, tmp_path):
    base, method = EXACT_EXPORTS[gguf_type]
    model = model_on(base, method, family, initializer_range=INIT_RANGE)
    merge_adapters(model)
    report = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", gguf_type)
    assert {t.type for t in report.tensors if t.name.startswith("blk.") and len(t.shape) == 2} == {gguf_type.upper()}
    assert bool(report.requantized) == (gguf_type == "f16")
    with torch.no_grad():
        ours = model(torch.tensor([prompt_ids])).logits[0]
    corr, max_diff = agreement(ours, llama_cpp_logits(tmp_path / "m.gguf", prompt_ids))
    relative = RELATIVE_ERROR[gguf_type]
    assert corr >= 1 - relative**2 / 2, (corr, max_diff)
    assert max_diff <= relative * ours.abs().max().item(), (corr, max_diff)


def test_the_reference_loads_with_plain_buffers_and_leaves_llama_cpps_defaults_alone(tmp_path):
    """``gguf_helpers.llama_cpp`` (every llama.cpp test) must load with ggml's extra buffer types off (its AMX path
    segfaults on Sapphire Rapids), and put llama-cpp-python's default parameters back as they were."""
    module = require("llama_cpp")
    write_gguf(model_on("q8_0", family="tiny-llama"), tiny_tokenizer(), tmp_path / "m.gguf", "q8_0")
    assert llama_cpp(tmp_path / "m.gguf").model_params.use_extra_bufts is False
    assert module.llama_cpp.llama_model_default_params().use_extra_bufts is True
    assert llama_cpp_reference.load(tmp_path / "m.gguf", plain_buffers=False, n_ctx=64, verbose=False
                                    ).model_params.use_extra_bufts is True
