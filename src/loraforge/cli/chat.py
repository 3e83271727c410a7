"""``loraforge chat``: one-shot or interactive chat with a model and an optional adapter."""

from __future__ import annotations

from loraforge.adapters import load_adapter
from loraforge.data.tokenize import prompt_ids
from loraforge.models import load_model, resolve_device
from loraforge.train.evaluate import generate_replies


def chat(model_source: str, adapter_dir: str | None, prompt: str | None, system: str | None,
         max_new_tokens: int, device: str | None = None) -> None:
    target = resolve_device(device)
    model, tokenizer = load_model(model_source)
    if adapter_dir:
        load_adapter(model, adapter_dir, base_model_name_or_path=model_source)
    model.to(target)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        ids = prompt_ids(tokenizer, history, "auto")
        answer = generate_replies(model, tokenizer, [ids], max_new_tokens, 1, target)[0].strip()
        history.append({"role": "assistant", "content": answer})
        return answer

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
