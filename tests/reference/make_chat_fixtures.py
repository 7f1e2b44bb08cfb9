#!/usr/bin/env python3
"""Chat-template and tokenization expectations from transformers (5.17, as on the GPU
machine; no torch needed): for the tokenizer of each golden fixture, what
`apply_chat_template` renders for a set of conversations and what the tokenizer gives for a
set of texts. mxr's tests render and tokenize the same inputs from the converted GGUF and
must produce identical strings and ids.

    python3 tests/reference/make_chat_fixtures.py   # writes tests/fixtures/chat/expected.json
"""
import json
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]

CONVERSATIONS = [
    ([{"role": "user", "text": "Hello!"}], True),
    ([{"role": "system", "text": "You are a poet."}, {"role": "user", "text": "Write a line."},
      {"role": "assistant", "text": "Roses are red."}, {"role": "user", "text": "More, please"}], True),
    ([{"role": "user", "text": "Zwei\nZeilen — ünïcode ✓  and  spaces"},
      {"role": "assistant", "text": "ok"}], False),
]

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "  leading spaces, trailing  ",
    "numbers 12345 and 3.14159",
    "<beginning_of_sentence>user name=user\nHi<end_of_sentence>\n",
    "ünïcode — ✓ 日本語",
    "",
]


def parts(conv):
    return [{"role": m["role"], "content": [{"type": "text", "text": m["text"]}]} for m in conv]


def main():
    out = {"transformers": transformers.__version__, "cases": {}}
    for case in ["equal-alpha", "distinct-alpha"]:
        tok = AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/golden" / case)
        chats = [{"messages": conv, "add_generation_prompt": gen,
                  "rendered": tok.apply_chat_template(parts(conv), tokenize=False, add_generation_prompt=gen)}
                 for conv, gen in CONVERSATIONS]
        texts = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TEXTS]
        out["cases"][case] = {"chats": chats, "texts": texts}
    path = ROOT / "tests/fixtures/chat/expected.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
