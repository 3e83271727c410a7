"""``loraforge chat``: one-shot or interactive chat with a model and an optional adapter; a vision-language
model also takes images (``--image``, with the first prompt). The base is held as ``serve`` holds it
(``--quantization``, see ``serve.base_model``)."""

from __future__ import annotations

from pathlib import Path

from loraforge.adapters import load_adapter
from loraforge.cli.main import CommandError
from loraforge.data.tokenize import prompt_ids
from loraforge.models import resolve_device
from loraforge.models.kind import is_vision_language
from loraforge.serve.base_model import load_serving_base
from loraforge.train.evaluate import generate_replies


def chat(model_source: str, adapter_dir: str | None, prompt: str | None, system: str | None,
         max_new_tokens: int, device: str | None = None, images: list[str] | None = None,
         quantization: str = "auto") -> None:
    target = resolve_device(device)
    model, tokenizer = load_serving_base(model_source, quantization, target)
    if adapter_dir:
        load_adapter(model, adapter_dir, base_model_name_or_path=model_source)
    model.to(target)
    if is_vision_language(model):
        reply = _vision_replies(model, tokenizer, system, images or [], max_new_tokens, target)
    elif images:
        raise CommandError(f"--image: {model_source} is a text model; images need a vision-language model "
                           "(a Qwen2-VL / Qwen2.5-VL folder)")
    else:
        reply = _text_replies(model, tokenizer, system, max_new_tokens, target)
    if prompt is not None:
        print(reply(prompt))
        return
    print("chatting with", model_source, f"+ {adapter_dir}" if adapter_dir else "", "(empty line or Ctrl-D quits)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        print("bot>", reply(text))


def _text_replies(model, tokenizer, system: str | None, max_new_tokens: int, target):
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        ids = prompt_ids(tokenizer, history, "auto")
        answer = generate_replies(model, tokenizer, [ids], max_new_tokens, 1, target)[0].strip()
        history.append({"role": "assistant", "content": answer})
        return answer

    return reply


def _vision_replies(model, processor, system: str | None, paths: list[str], max_new_tokens: int, target):
    """A ``reply(text)`` whose first user turn shows the ``--image`` files (local paths, or data URLs)."""
    from loraforge.data.images import image_ref
    from loraforge.data.vision import prompt_sample
    from loraforge.train.vision_generate import generate_vision_reply

    pending = [image_ref(path, Path.cwd(), f"--image {path}") for path in paths]
    images = []
    history: list[dict] = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []

    def reply(text: str) -> str:
        nonlocal pending
        history.append({"role": "user", "content": [{"type": "image"}] * len(pending) + [{"type": "text",
                                                                                           "text": text}]})
        images.extend(pending)
        pending = []
        sample = prompt_sample(processor, history, images, processor.chat_template)
        answer = generate_vision_reply(model, processor, sample, max_new_tokens, target).strip()
        history.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer

    return reply
