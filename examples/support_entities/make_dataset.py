"""The support_entities example: synthetic Ledgerly support tickets tagged for named entities (IOB2).

Entity types: product (Ledgerly plans and add-ons), order_id (INV-/ORD- numbers), date, person (agent names
customers mention). Every sentence is built from a template with slots, so the tags are exact by
construction. Seeded: `python examples/support_entities/make_dataset.py` rewrites tagged.jsonl byte for byte.
Nothing here is real data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7
ROWS = 300

PRODUCTS = ["Ledgerly Pro", "Ledgerly Basic", "Ledgerly Teams", "Payroll Add-on", "Receipt Scanner",
            "Tax Assistant", "Ledgerly Go", "Multi-currency Pack"]
PEOPLE = ["Maria", "Tom Becker", "Aisha", "Jonas Weber", "Priya", "Li Wei", "Carlos", "Emma Stone"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TEMPLATES = [
    "I upgraded to {product} on {date} but invoice {order} still shows the old price .",
    "Order {order} for {product} was charged twice , please refund it .",
    "{person} from support promised a callback on {date} about {order} .",
    "Can I move my {product} subscription to {product} before {date} ?",
    "The {product} export crashes since {date} , my colleague {person} sees it too .",
    "Please cancel {order} , I bought {product} by mistake .",
    "Where is the receipt for {order} ? It was paid on {date} .",
    "Thanks {person} , the {product} issue is fixed .",
    "My trial of {product} ends on {date} and I want to keep my data .",
    "Invoice {order} lists {product} twice .",
    "Is {product} included in my plan or do I pay extra ?",
    "I cannot log in since {date} .",
    "The app is slow when I open large reports .",
    "{person} , could you resend the invoice for {order} ?",
]


def _date(rng: random.Random) -> list[str]:
    style = rng.random()
    if style < 0.4:
        return [str(rng.randint(1, 28)), rng.choice(MONTHS)]
    if style < 0.7:
        return [rng.choice(MONTHS), str(rng.randint(1, 28))]
    return [f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"]


def _order(rng: random.Random) -> list[str]:
    return [f"{rng.choice(['INV', 'ORD'])}-{rng.randint(10000, 99999)}"]


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for piece in rng.choice(TEMPLATES).split(" "):
        slot = piece[1:-1] if piece.startswith("{") and piece.endswith("}") else None
        if slot is None:
            words.append(piece)
            tags.append("O")
            continue
        value = {"product": lambda: rng.choice(PRODUCTS).split(" "), "person": lambda: rng.choice(PEOPLE).split(" "),
                 "date": lambda: _date(rng), "order": lambda: _order(rng)}[slot]()
        typ = "order_id" if slot == "order" else slot
        words += value
        tags += [f"B-{typ}"] + [f"I-{typ}"] * (len(value) - 1)
    return words, tags


def generate() -> list[dict]:
    rng = random.Random(SEED)
    rows = []
    for i in range(ROWS):
        words, tags = sentence(rng)
        rows.append({"ticket_id": f"E{i + 1:04d}", "tokens": words, "tags": tags})
    return rows


def main() -> None:
    with open(HERE / "tagged.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for r in generate():
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
