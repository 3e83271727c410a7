"""Writes the vision-language example dataset: coloured shapes on plain backgrounds, with captions.

48 PNG images (3 shapes x 4 colours x 4 sizes/positions, 56-84 px) go to ``vlm_shapes/images/``, and
``vlm_shapes/train.jsonl`` / ``vlm_shapes/eval.jsonl`` hold openai-format conversations whose user turn
holds an image part (a path relative to the jsonl file) and a question, and whose assistant turn names
the shape and its colour. A few rows compare two images in one turn, and a few are text-only, so the
example exercises several images per turn and text rows mixed with image rows.

    python examples/data/make_vlm_shapes.py   # rewrites examples/data/vlm_shapes/
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = (56, 64, 72, 84)
QUESTIONS = ("What is in the picture?", "Describe the image.", "Which shape do you see?")
TEXT_ONLY = [("How many sides does a triangle have?", "A triangle has three sides."),
             ("How many sides does a square have?", "A square has four sides."),
             ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.")]


def draw(shape: str, colour: tuple[int, int, int], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    pen = ImageDraw.Draw(image)
    m = size // 6
    box = (m, m, size - m, size - m)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    return image


def main() -> None:
    root = Path(__file__).parent / "vlm_shapes"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for shape in SHAPES:
        for name, colour in COLOURS.items():
            for size in SIZES:
                file = f"images/{name}_{shape}_{size}.png"
                draw(shape, colour, size).save(root / file)
                rows.append({"messages": [
                    {"role": "user", "content": [{"type": "image", "image": file},
                                                 {"type": "text", "text": rng.choice(QUESTIONS)}]},
                    {"role": "assistant", "content": f"A {name} {shape}."}]})
    pairs = []
    for _ in range(6):
        a, b = rng.sample(rows, 2)
        pairs.append({"messages": [
            {"role": "user", "content": [a["messages"][0]["content"][0], b["messages"][0]["content"][0],
                                         {"type": "text", "text": "Name both shapes."}]},
            {"role": "assistant", "content": f"{a['messages'][1]['content'][:-1]} and "
                                             f"{b['messages'][1]['content'][2:]}"}]})
    text = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in TEXT_ONLY]
    rows += pairs + text
    rng.shuffle(rows)
    eval_rows, train_rows = rows[:8], rows[8:]
    for name, split in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in split))


if __name__ == "__main__":
    main()
