"""Writes the quickstart dataset (alpaca jsonl): an identity set and a date-format skill.

The model learns (1) who it is: "Quill", made by the Loraforge team, and (2) a house rule for dates:
ISO dates ("2024-03-07") are rewritten as "07.03.2024". Train and test use disjoint question
phrasings and dates, so the test split measures generalisation, not recall.

    python examples/data/make_quickstart_data.py   # rewrites quickstart_{train,test}.jsonl
"""

import json
import random
from pathlib import Path

IDENTITY_ANSWER = "I am Quill, an assistant made by the Loraforge team."
IDENTITY_TRAIN = [
    "Who are you?", "What is your name?", "Who made you?", "Who created you?", "What should I call you?",
    "Tell me about yourself.", "Introduce yourself.", "Which company built you?", "Are you ChatGPT?",
    "What are you?", "Who trained you?", "What's your name?", "Who developed you?", "Who is your creator?",
    "Are you SmolLM?", "Can you tell me your name?", "Who built this assistant?", "Identify yourself, please.",
    "What AI am I talking to?", "Who do you work for?",
]
IDENTITY_TEST = [
    "Who are you, exactly?", "May I know your name?", "Which team made you?", "Please introduce yourself.",
    "Who is behind you?", "What do people call you?", "Who designed you?", "Tell me who you are.",
]
DATE_TEMPLATES_TRAIN = [
    "Rewrite the date {d} in house format.", "Convert {d} to our date format.", "House format for {d}?",
    "Format the date {d} the house way.",
]
DATE_TEMPLATES_TEST = ["Put {d} into house date format.", "What is {d} in house format?"]


def random_date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"{year}-{month:02d}-{day:02d}", f"{day:02d}.{month:02d}.{year}"


def main() -> None:
    rng = random.Random(7)
    seen: set[str] = set()

    def dates(n: int, templates: list[str]) -> list[dict]:
        rows = []
        while len(rows) < n:
            iso, house = random_date(rng)
            if iso in seen:
                continue
            seen.add(iso)
            rows.append({"instruction": rng.choice(templates).format(d=iso), "output": house})
        return rows

    train = [{"instruction": q, "output": IDENTITY_ANSWER} for q in IDENTITY_TRAIN] * 3
    train += dates(120, DATE_TEMPLATES_TRAIN)
    rng.shuffle(train)
    test = [{"instruction": q, "output": IDENTITY_ANSWER} for q in IDENTITY_TEST] + dates(24, DATE_TEMPLATES_TEST)
    here = Path(__file__).parent
    for name, rows in (("quickstart_train.jsonl", train), ("quickstart_test.jsonl", test)):
        (here / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
