"""Write `tiny_prefs.jsonl`: 64 synthetic preference pairs for the offline CPU smoke run of the recipe.

The pairs are made up here (no external data): a prompt, a preferred answer that is correct and polite, and a
dispreferred one that is wrong, unhelpful or rude. They only need a small, fixed vocabulary that
`recipes/make_tiny_model.py` can build a word-level tokenizer from. Deterministic: re-running rewrites the same file.

    python recipes/data/generate_tiny_prefs.py [OUT_FILE]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red"}
ANIMALS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "owl": "hoots"}
TASKS = ["boil an egg", "plant a tree", "write a letter", "tie a knot", "wash a cup", "fold a shirt"]


def make_pairs(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        kind = len(rows) % 4
        if kind == 0:
            a, b = rng.randint(0, 6), rng.randint(0, 6)
            wrong = rng.choice([k for k in range(13) if k != a + b])
            prompt = f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?"
            chosen = f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ."
            rejected = f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[wrong]} ."
        elif kind == 1:
            thing = rng.choice(sorted(COLORS))
            wrong = rng.choice([c for c in COLORS.values() if c != COLORS[thing]])
            prompt = f"what color is the {thing} ?"
            chosen = f"the {thing} is {COLORS[thing]} ."
            rejected = rng.choice([f"the {thing} is {wrong} .", "i do not know ."])
        elif kind == 2:
            animal = rng.choice(sorted(ANIMALS))
            wrong = rng.choice([s for s in ANIMALS.values() if s != ANIMALS[animal]])
            prompt = f"what sound does a {animal} make ?"
            chosen = f"a {animal} {ANIMALS[animal]} ."
            rejected = f"a {animal} {wrong} ."
        else:
            task = rng.choice(TASKS)
            prompt = f"please tell me how to {task} ."
            chosen = f"sure , here is how to {task} : go step by step and take your time ."
            rejected = rng.choice(["no .", "figure it out yourself .", f"why would you want to {task} ?"])
        if (prompt, chosen, rejected) in seen:  # keep the pairs distinct
            continue
        seen.add((prompt, chosen, rejected))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).with_name("tiny_prefs.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for row in make_pairs():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
