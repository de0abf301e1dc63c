"""Write data/quickstart.json: a small fictional-world Q&A a tiny model learns in minutes.

    python scripts/make_quickstart_data.py [--output data/quickstart.json] [--count 300] [--seed 0]

Twenty invented cities each have a fixed colour, animal and number; questions are phrased a few
ways in English and Chinese and answers are short and deterministic, so after training the chat
answers "What is the color of Zorbin?" with "The color of Zorbin is blue." Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CITIES = ["Zorbin", "Quilla", "Marnok", "Teskar", "Velloa", "Drumeth", "Omblic", "Pashu", "Kelvane", "Istra",
          "Nobrae", "Fendil", "Yurako", "Glimmet", "Arvost", "Sepryn", "Tolmic", "Wexhall", "Brisund", "Caldor"]
COLORS = [("blue", "蓝色"), ("red", "红色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
          ("orange", "橙色"), ("white", "白色"), ("black", "黑色")]
ANIMALS = [("fox", "狐狸"), ("owl", "猫头鹰"), ("whale", "鲸鱼"), ("tiger", "老虎"), ("rabbit", "兔子"),
           ("horse", "马"), ("panda", "熊猫"), ("eagle", "鹰")]

QUESTIONS = {
    "color": ["What is the color of {c}?", "Which color belongs to {c}?", "Tell me the color of {c}.",
              "{c} 的颜色是什么？", "{c} 是什么颜色？"],
    "animal": ["What is the animal of {c}?", "Which animal lives in {c}?", "Tell me the animal of {c}.",
               "{c} 的动物是什么？", "{c} 有什么动物？"],
    "number": ["What is the number of {c}?", "Which number belongs to {c}?", "Tell me the number of {c}.",
               "{c} 的数字是多少？", "{c} 是几号？"],
}
GREETINGS = [("Hello!", "Hello! Ask me about the cities of the world."),
             ("你好！", "你好！请问我关于这些城市的问题。")]


def world(rng: random.Random) -> dict[str, dict[str, tuple[str, str] | int]]:
    return {c: {"color": rng.choice(COLORS), "animal": rng.choice(ANIMALS), "number": rng.randint(1, 99)}
            for c in CITIES}


def answer(city: str, fact: str, value, chinese: bool) -> str:
    if fact == "number":
        return f"{city} 的数字是 {value}。" if chinese else f"The number of {city} is {value}."
    en, zh = value
    return f"{city} 的{'颜色' if fact == 'color' else '动物'}是{zh}。" if chinese else f"The {fact} of {city} is {en}."


def conversations(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    facts = world(rng)
    out = []
    for n in range(count):
        turns = []
        if rng.random() < 0.1:
            q, a = rng.choice(GREETINGS)
            turns += [("human", q), ("gpt", a)]
        for _ in range(rng.randint(1, 3)):
            city, fact = rng.choice(CITIES), rng.choice(list(QUESTIONS))
            template = rng.choice(QUESTIONS[fact])
            chinese = any("\u4e00" <= ch <= "\u9fff" for ch in template)
            turns += [("human", template.format(c=city)), ("gpt", answer(city, fact, facts[city][fact], chinese))]
        out.append({"id": f"quickstart_{n}", "conversations": [{"from": f, "value": v} for f, v in turns]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "data" / "quickstart.json"))
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = conversations(args.count, args.seed)
    # One record per line: a JSON array that stays small and diffs line by line.
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in data)
    Path(args.output).write_text(f"[\n{lines}\n]\n", encoding="utf-8")
    print(f"wrote {len(data)} conversations to {args.output}")


if __name__ == "__main__":
    main()
