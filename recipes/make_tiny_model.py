"""Build the tiny Llama + word-level tokenizer that `recipes/configs/tiny_cpu.yaml` trains, offline.

Nothing is downloaded: the tokenizer is trained on the words of the recipe's preference data and the model is a
randomly initialised 2-layer Llama of width 64 (`trl_cpo.tiny`). It only exists so that the recipe can run end to
end on a CPU; it learns nothing useful.

    python recipes/make_tiny_model.py outputs/tiny-llama          # the path tiny_cpu.yaml points at
    python recipes/make_tiny_model.py DIR --data my_prefs.jsonl    # vocabulary from another preference file
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "tiny_prefs.jsonl"
DEFAULT_OUT = "outputs/tiny-llama"
#: A minimal chat template, so that conversational preference data (lists of messages) also runs on the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)
CHAT_WORDS = ["system", "user", "assistant", ":"]


def preference_texts(path: str | Path) -> list[str]:
    """All prompt / chosen / rejected strings of a JSON-lines preference file."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                for key in ("prompt", "chosen", "rejected"):
                    value = row.get(key)
                    if isinstance(value, list):  # conversational: a list of messages
                        texts.extend(str(message.get("content", "")) for message in value)
                    elif value is not None:
                        texts.append(str(value))
    return texts


def build(out_dir: str | Path, data: str | Path = DEFAULT_DATA, hidden_size: int = 64, num_layers: int = 2) -> Path:
    from trl_cpo.tiny import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer([*preference_texts(data), " ".join(CHAT_WORDS)])
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default=DEFAULT_OUT, help=f"where to save (default: {DEFAULT_OUT})")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="JSON-lines preference file for the vocabulary")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    args = parser.parse_args(argv)
    out = build(args.out_dir, args.data, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"Saved a tiny Llama and its tokenizer to {out}")


if __name__ == "__main__":
    main()
