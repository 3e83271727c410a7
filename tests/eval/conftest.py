"""Tiny models, PEFT-made adapters and small data files shared by the evaluation tests.

The references are independent of loraforge's adapter code: adapters are written by PEFT and the
reference models are PEFT's ``merge_and_unload`` of them."""

import json

import pytest
import torch
from references import require

from loraforge.models import tiny_model, tiny_tokenizer

ADAPTERS = {
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "mlp": {"r": 8, "lora_alpha": 8, "target_modules": ["gate_proj", "up_proj", "down_proj", "o_proj"]},
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads on this shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_peft_adapter(directory, seed, family="tiny-llama", model_overrides=None, **lora_kwargs):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved by PEFT itself."""
    peft = require("peft")
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_model(family, **(model_overrides or {})),
                                peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(directory)
    return directory


def reference_model(adapter_dir=None):
    """tiny-llama, with the adapter merged by PEFT when given: the independent reference."""
    model = tiny_model("tiny-llama")
    if adapter_dir is None:
        return model
    peft = require("peft")
    return peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-adapters")
    return {name: save_peft_adapter(root / name, seed=k + 1, **kw) for k, (name, kw) in enumerate(ADAPTERS.items())}


CONVERSATIONS = [{"instruction": f"say {w}", "output": w.upper()} for w in ["cat", "dog", "sun", "sky", "red", "box"]]

QUESTIONS = [
    {"subject": "animals", "question": "Which one barks?", "choices": ["dog", "cat", "fish"], "answer": 0},
    {"subject": "animals", "question": "Which one swims?", "choices": ["cow", "fish"], "answer": "B"},
    {"subject": "colors", "question": "Color of grass?", "choices": ["red", "blue", "green", "pink"], "answer": 2},
    {"subject": "colors", "question": "Color of the sky?", "choices": ["blue", "black"], "answer": "0"},
    {"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
]


@pytest.fixture
def conversation_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    return path


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    return path
