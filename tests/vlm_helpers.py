"""Shared pieces of the vision-language tests: small image datasets on disk, the transformers processor
as a reference, and the tiny VLM's inputs."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

from loraforge.models.tiny_vlm import tiny_vlm_processor

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def png(path: Path, colour=(220, 40, 40), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def data_url(colour=(40, 80, 220), size=(56, 28)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def image_row(image: str, question: str = "What is it?", answer: str = "A red box.") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def text_row(question: str = "Hi?", answer: str = "Hello there.") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def shapes_dataset(folder: Path, n: int = 12) -> Path:
    """``n`` rows: one-image rows of three colours and sizes, a two-image row and a text-only row."""
    rows = []
    for i in range(n - 2):
        name, colour = list(COLOURS.items())[i % 3]
        png(folder / "img" / f"{i}.png", colour, (28 + 14 * (i % 3), 28 + 7 * (i % 4)))
        rows.append(image_row(f"img/{i}.png", answer=f"A {name} box."))
    rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                           {"type": "image_url", "image_url": {"url": data_url()}},
                                                           {"type": "text", "text": "Both?"}]},
                              {"role": "assistant", "content": "Red and blue."}]})
    rows.append(text_row())
    return write_jsonl(folder / "train.jsonl", rows)


def reference_processor():
    """transformers' ``Qwen2_5_VLProcessor`` over the tiny VLM's tokenizer and image processor. Its
    constructor insists that a video processor class be importable, which needs torchvision; loraforge
    handles no video, so that class check alone is bypassed for the test."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    ours = tiny_vlm_processor()
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: type(arg)
    try:
        return Qwen2_5_VLProcessor(image_processor=ours.image_processor, tokenizer=ours.tokenizer,
                                   video_processor=None, chat_template=ours.chat_template)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def shapes_batch(folder: Path) -> dict:
    """A collated batch of the tiny VLM's processor over ``shapes_dataset``'s last 4 rows (a two-image row,
    a text row, one-image rows), labels included."""
    from loraforge.data.vision import build_vision_datasets, collate_vision
    from loraforge.models.tiny_vlm import tiny_vlm_processor

    processor = tiny_vlm_processor()
    data = build_vision_datasets(processor, train_files=[str(shapes_dataset(folder))], eval_files=None,
                                 format="openai", columns=None, val_size=0, cutoff_len=512, train_on_prompt=False,
                                 system_prompt=None, template="auto", on_overflow="drop", seed=0)
    return collate_vision(data.train[-4:], processor)
