"""Image + text conversations for vision-language models: records -> checked conversations -> samples
with expanded image tokens -> batches with pixels.

Record formats (``data.format``):

- ``openai``: ``messages``; a message's ``content`` is a string or a list of parts
  ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <path or data URL>}`` or
  ``{"type": "image_url", "image_url": {"url": <path or data URL>}}``.
- ``sharegpt``: ``conversations`` of ``{"from", "value"}`` whose values hold ``<image>`` tags, one per
  entry of the record's ``images`` list, in order (LLaMA-Factory's layout). ``openai`` string contents
  take ``<image>`` tags and ``images`` the same way.

Image paths are relative to the data file. Images belong in user turns; rows without images mix freely
with image rows. Every image becomes ``image_token_count`` copies of the image token (the image
processor's resize rule), none of which carries a label. ``cutoff_len`` never cuts through an image:
a sample whose images reach past it is dropped (``data.on_overflow: drop``, counted, with the first
origins reported) or fails the run (``error``); text after the last image is truncated as usual.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.data.collate import collate
from loraforge.data.dataset import DataReport
from loraforge.data.formats import SHAREGPT_ROLES, _check_roles
from loraforge.data.images import ImageRef, image_ref
from loraforge.data.readers import DataError, Record
from loraforge.data.template import render
from loraforge.data.tokenize import IGNORE_INDEX, SplitReport, encode_conversation

IMAGE_TAG = "<image>"
VISION_FORMATS = ("openai", "sharegpt")
SHOWN_ORIGINS = 5
"""How many file:line references a report or error lists."""


@dataclass(frozen=True)
class VisionConversation:
    """Messages whose ``content`` is a list of ``{"type": "text", "text"}`` / ``{"type": "image"}`` parts,
    the images in the order their parts appear, and the record's ``origin``."""

    messages: list[dict[str, Any]]
    images: tuple[ImageRef, ...]
    origin: str


@dataclass(frozen=True)
class VisionSample:
    """A training row: ``input_ids``/``labels`` with each image already expanded to its tokens, and the
    images whose pixels fill them. ``position_ids`` is always None (rows are never packed: M-RoPE positions
    are computed by the model from the image grids)."""

    input_ids: list[int]
    labels: list[int]
    images: tuple[ImageRef, ...] = ()
    position_ids: None = None


@dataclass
class VisionSplitReport(SplitReport):
    """``SplitReport`` plus the origins of samples dropped because ``cutoff_len`` would cut an image."""

    image_overflow: list[str] = field(default_factory=list)


@dataclass
class VisionDataReport(DataReport):
    def __str__(self) -> str:
        lines = [super().__str__()]
        for name, report in (("train", self.train), ("eval", self.eval)):
            if report is not None and report.image_overflow:
                lines.append(f"{name}: {len(report.image_overflow)} of the dropped samples had image tokens past "
                             f"cutoff_len={self.cutoff_len} (first: {', '.join(report.image_overflow[:SHOWN_ORIGINS])})"
                             "; raise data.cutoff_len or set data.on_overflow: error to stop instead")
        return "\n".join(lines)


def to_vision_conversations(records: Sequence[Record], format: str, columns: dict[str, str] | None,
                            system_prompt: str | None) -> list[VisionConversation]:
    """Parse and check records (see the module docstring); every image is opened once here.

    Raises:
        DataError: with the record's file:line: an unsupported format, a malformed message or part, an
            image part in an assistant turn, ``<image>`` tags that don't match ``images``, a missing or
            unreadable image, or a wrong role order.
    """
    if format not in VISION_FORMATS:
        raise DataError(f"data.format {format!r} has no image parts; vision-language data is openai or sharegpt")
    columns = dict(columns or {})
    out = []
    for record in records:
        base_dir = Path(record.origin.rpartition(":")[0]).parent
        tagged = _column(record, columns, "images", list, required=False) or []
        if format == "openai":
            raw = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
                   for m in _column(record, columns, "messages", list, required=True)]
        else:
            raw = _sharegpt_turns(record, columns)
        messages, images, tags_used = [], [], 0
        for i, (role, content) in enumerate(raw):
            if role is None or content is None:
                raise DataError(f"{record.origin}: message {i} must be an object with a role and a content")
            parts = _parts(content, record.origin, i)
            for part in parts:
                if part["type"] != "image":
                    continue
                if role != "user":
                    raise DataError(f"{record.origin}: message {i} ({role}) holds an image; images belong in user "
                                    "turns")
                if "image" in part:
                    images.append(image_ref(part.pop("image"), base_dir, record.origin))
                else:
                    if tags_used >= len(tagged):
                        raise DataError(f"{record.origin}: more <image> tags than images: the record lists "
                                        f"{len(tagged)} in {columns.get('images', 'images')!r}")
                    images.append(image_ref(tagged[tags_used], base_dir, record.origin))
                    tags_used += 1
            messages.append({"role": role, "content": parts})
        if tags_used != len(tagged):
            raise DataError(f"{record.origin}: {len(tagged)} images listed but only {tags_used} <image> tags in the "
                            "user turns; put one <image> tag where each image goes")
        if system_prompt is not None and messages and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        _check_roles([{"role": m["role"], "content": _text(m["content"])} for m in messages], record.origin)
        out.append(VisionConversation(messages, tuple(images), record.origin))
    return out


def _column(record: Record, columns: dict[str, str], name: str, kind: type, required: bool):
    column = columns.get(name, name)
    value = record.fields.get(column)
    if value is None:
        if required:
            raise DataError(f"{record.origin}: missing required field {column!r}; the record has "
                            f"{sorted(record.fields)}")
        return None
    if not isinstance(value, kind):
        raise DataError(f"{record.origin}: field {column!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _sharegpt_turns(record: Record, columns: dict[str, str]) -> list[tuple[str | None, Any]]:
    role_key, content_key = columns.get("role_tag", "from"), columns.get("content_tag", "value")
    turns = []
    for i, turn in enumerate(_column(record, columns, "conversations", list, required=True)):
        if not isinstance(turn, dict) or turn.get(role_key) not in SHAREGPT_ROLES:
            raise DataError(f"{record.origin}: conversations[{i}] must be an object with {role_key!r} (one of "
                            f"{list(SHAREGPT_ROLES)}) and {content_key!r}")
        turns.append((SHAREGPT_ROLES[turn[role_key]], turn.get(content_key)))
    system = _column(record, columns, "system", str, required=False)
    return ([("system", system)] if system is not None else []) + turns


def _parts(content: Any, origin: str, i: int) -> list[dict]:
    """Content as text/image parts; an image part keeps its reference under ``"image"`` until resolved,
    an ``<image>`` tag becomes a part without one."""
    if isinstance(content, str):
        pieces = re.split(f"({re.escape(IMAGE_TAG)})", content)
        return [{"type": "image"} if p == IMAGE_TAG else {"type": "text", "text": p} for p in pieces if p]
    if not isinstance(content, list):
        raise DataError(f"{origin}: message {i} content must be a string or a list of parts, got "
                        f"{type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image" and "image" in part:
            parts.append({"type": "image", "image": part["image"]})
        elif kind == "image_url":
            url = part.get("image_url")
            parts.append({"type": "image", "image": url.get("url") if isinstance(url, dict) else url})
        else:
            raise DataError(f"{origin}: message {i} content[{j}] must be a text, image or image_url part, got "
                            f"{part!r:.80}")
    return parts


def _text(parts: list[dict]) -> str:
    return "".join(p.get("text", "") for p in parts) or ("<image>" if parts else "")


def tokenize_vision_conversations(processor, conversations: Sequence[VisionConversation], chat_template: str,
                                  cutoff_len: int, train_on_prompt: bool,
                                  on_overflow: str) -> tuple[list[VisionSample], VisionSplitReport]:
    """Samples with every image expanded to its tokens (no label on any of them), cut to ``cutoff_len``
    without cutting an image (see the module docstring).

    Raises:
        DataError: the template renders a different number of image tokens than the conversation has
            images, or (``on_overflow: error``) a sample's images reach past ``cutoff_len``.
    """
    image_id = processor.image_token_id
    samples, report = [], VisionSplitReport(samples=len(conversations))
    for conversation in conversations:
        try:
            ids, labels = encode_conversation(processor.tokenizer, conversation.messages, chat_template,
                                              train_on_prompt)
        except DataError as e:
            raise DataError(f"{conversation.origin}: {e}") from None
        placeholders = ids.count(image_id)
        if placeholders != len(conversation.images):
            raise DataError(f"{conversation.origin}: the chat template rendered {placeholders} image tokens for "
                            f"{len(conversation.images)} images; use a template that renders image parts")
        ids, labels, image_end = _expand_images(ids, labels, conversation.images, processor, image_id)
        if len(ids) > cutoff_len:
            if image_end > cutoff_len:
                if on_overflow == "error":
                    raise DataError(f"{conversation.origin}: its image tokens end at token {image_end}, past "
                                    f"data.cutoff_len={cutoff_len}; cutting there would separate an image from "
                                    "its tokens. Raise data.cutoff_len, shrink the images, or set "
                                    "data.on_overflow: drop")
                report.dropped += 1
                report.image_overflow.append(conversation.origin)
                continue
            report.truncated += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if report.admit(ids, labels):
            samples.append(VisionSample(ids, labels, conversation.images))
    return samples, report


def _expand_images(ids: list[int], labels: list[int], images: Sequence[ImageRef], processor,
                   image_id: int) -> tuple[list[int], list[int], int]:
    """Repeat the k-th image token ``image_token_count(images[k])`` times; returns the ids, the labels
    (-100 on every image token) and the index just past the last image token (0 without images)."""
    out_ids, out_labels, k, end = [], [], 0, 0
    for token, label in zip(ids, labels):
        if token == image_id:
            n = processor.image_token_count(*images[k].size)
            out_ids += [image_id] * n
            out_labels += [IGNORE_INDEX] * n
            k += 1
            end = len(out_ids)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels, end


def prompt_sample(processor, messages: Sequence[dict], images: Sequence[ImageRef], chat_template: str) -> VisionSample:
    """The generation input for ``messages`` (parts as in :class:`VisionConversation`, ending with a user
    turn): rendered with the generation prompt, tokenized, each image expanded to its tokens.

    Raises:
        DataError: the template renders a different number of image tokens than there are ``images``.
    """
    text = render(processor.tokenizer, messages, chat_template, add_generation_prompt=True)
    ids = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids.count(processor.image_token_id) != len(images):
        raise DataError(f"the chat template rendered {ids.count(processor.image_token_id)} image tokens for "
                        f"{len(images)} images; use a template that renders image parts")
    ids, labels, _ = _expand_images(ids, [IGNORE_INDEX] * len(ids), images, processor, processor.image_token_id)
    return VisionSample(ids, labels, tuple(images))


def collate_vision(samples: Sequence[VisionSample], processor) -> dict[str, torch.Tensor]:
    """``collate`` (right-padded ``input_ids``, ``labels``, ``attention_mask``) plus ``mm_token_type_ids``
    (1 on image tokens: what the model computes M-RoPE positions from) and, when any sample has images,
    their ``pixel_values`` and ``image_grid_thw`` in row order, which is the order the model scatters image
    features into the image tokens."""
    batch = collate(samples, processor.pad_token_id)
    batch["mm_token_type_ids"] = (batch["input_ids"] == processor.image_token_id).int()
    images = [image.open() for sample in samples for image in sample.images]
    if images:
        batch.update(processor.pixels(images))
    return batch


def vision_chat_template(processor, template: str) -> str:
    """The Jinja template ``data.template`` selects for a vision-language model: ``auto`` is the
    processor's own, ``chatml`` loraforge's ChatML with image parts."""
    from loraforge.models.vision import VISION_CHATML_TEMPLATE

    if template == "chatml":
        return VISION_CHATML_TEMPLATE
    return processor.chat_template


def check_vision_data_options(packing: bool, test_files) -> None:
    """Data options that vision-language training does not take, as one error."""
    problems = []
    if packing:
        problems.append("data.packing: packed rows would need M-RoPE positions restarting per sample, which the "
                        "model's position computation does not do; set packing: false")
    if test_files:
        problems.append("data.test_files: exact-match generation is for text models; score a vision-language run "
                        "with eval_files (eval loss) instead")
    if problems:
        raise DataError("; ".join(problems))


def build_vision_datasets(processor, *, train_files, eval_files, format: str, columns, val_size, cutoff_len: int,
                          train_on_prompt: bool, system_prompt: str | None, template: str, on_overflow: str,
                          seed: int):
    """``data.build_datasets`` for a vision-language model: the same split rules, image conversations,
    no packing and no test split (``check_vision_data_options``).

    Raises:
        DataError: as ``build_datasets`` and ``to_vision_conversations``, and for image overflow with
            ``on_overflow: error``.
    """
    from loraforge.data.dataset import Datasets, _check_not_empty, _check_val_size, _split
    from loraforge.data.readers import read_records

    if not train_files:
        raise DataError("data.train_files is empty; give at least one dataset file or folder")
    _check_val_size(val_size, bool(eval_files))

    def conversations(files):
        return to_vision_conversations(read_records(files), format, columns, system_prompt) if files else []

    train_conv, eval_conv = conversations(train_files), conversations(eval_files)
    if not train_conv:
        raise DataError(f"the train split is empty: no records in {train_files}")
    if val_size:
        train_conv, eval_conv = _split(train_conv, val_size, seed)
    chat_template = vision_chat_template(processor, template)

    def tokenize(convs):
        return tokenize_vision_conversations(processor, convs, chat_template, cutoff_len, train_on_prompt,
                                             on_overflow)

    train, train_report = tokenize(train_conv)
    if not train and train_report.image_overflow:
        raise DataError(f"the train split is empty: {len(train_report.image_overflow)} of {train_report.samples} "
                        f"samples have image tokens past data.cutoff_len={cutoff_len} (first: "
                        f"{', '.join(train_report.image_overflow[:SHOWN_ORIGINS])}); raise data.cutoff_len")
    _check_not_empty("train", train_report, train_files, cutoff_len)
    eval_samples, eval_report = tokenize(eval_conv)
    if eval_conv:
        _check_not_empty("eval", eval_report, eval_files or train_files, cutoff_len)
    report = VisionDataReport(train=train_report, eval=eval_report if eval_conv else None, test=0,
                              cutoff_len=cutoff_len, train_rows=len(train), eval_rows=len(eval_samples))
    return Datasets(train, eval_samples, [], report)
