"""Chat requests with OpenAI ``image_url`` parts, for a vision-language model: messages -> a prompt whose
image tokens are expanded, and the images it shows.

An image is a ``data:image/...;base64,`` URL, or a local file (a path or ``file://`` URL) inside the
server's image root; with no root, local files are refused, and nothing is ever fetched over the network.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.data.images import ImageRef, image_ref
from loraforge.data.readers import DataError
from loraforge.data.vision import prompt_sample
from loraforge.serve.http_errors import APIError
from loraforge.serve.request_bodies import ChatMessage


def vision_prompt(processor, messages: list[ChatMessage], image_root: Path | None) -> tuple[list[int], list[ImageRef]]:
    """Prompt token ids (the processor's chat template, with the generation prompt) and the images in order.

    Raises:
        APIError: 400 for an image outside a user turn, a local file with no image root or outside it, a
            remote URL, or bytes that are not an image (the message names ``messages[i].content[j]``).
    """
    parts_of, images = [], []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            parts = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                where = f"messages[{i}].content[{j}]"
                if message.role != "user":
                    raise APIError(400, f"{where}: images belong in user messages, not {message.role}", param="messages")
                images.append(_image(part.image_url.url, image_root, where))
                parts.append({"type": "image"})
        else:
            parts = [{"type": "text", "text": message.content or ""}]
        parts_of.append({"role": message.role, "content": parts})
    try:
        sample = prompt_sample(processor, parts_of, images, processor.chat_template)
    except DataError as err:
        raise APIError(400, str(err), param="messages") from None
    return sample.input_ids, images


def _image(url: str, image_root: Path | None, where: str) -> ImageRef:
    if not url.startswith("data:") and image_root is None:
        raise APIError(400, f"{where}: local image files are off on this server (start it with --image-root DIR); "
                            "send the image as a data:image/...;base64 URL", param="messages")
    try:
        return image_ref(url, image_root or Path.cwd(), where, allowed_root=image_root)
    except DataError as err:
        raise APIError(400, str(err), param="messages") from None
