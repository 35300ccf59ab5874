"""Write the small example datasets the README's fine-tuning commands use (deterministic).

    python examples/make_examples.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def arithmetic_chat(n: int, seed: int) -> list[dict]:
    """Chat: the assistant adds two numbers and answers in one sentence."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        question = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"{a} + {b} = ?"])
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    return rows


WOMEN = ["Mary", "Alice", "Emma", "Sarah", "Linda", "Anna", "Julia", "Laura", "Grace", "Helen", "Sophie", "Olivia"]
MEN = ["John", "David", "James", "Peter", "Thomas", "Paul", "Mark", "George", "Henry", "Daniel", "Oliver", "Jack"]
VERBS = ["hired", "called", "thanked", "helped", "visited", "paid", "invited", "warned"]


def agent_gender(n: int, seed: int) -> list[dict]:
    """Classification where word order decides: who acted, a woman or a man ("John was hired by Mary")."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        woman, man, verb = rng.choice(WOMEN), rng.choice(MEN), rng.choice(VERBS)
        woman_acts = rng.random() < 0.5
        agent, patient = (woman, man) if woman_acts else (man, woman)
        text = f"{agent} {verb} {patient} yesterday." if rng.random() < 0.5 else f"{patient} was {verb} by {agent} yesterday."
        rows.append({"text": text, "label": "woman" if woman_acts else "man"})
    return rows


def sentiment(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    good = ["good", "great", "wonderful", "lovely", "excellent"]
    bad = ["bad", "awful", "terrible", "poor", "dreadful"]
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        thing = rng.choice(["film", "meal", "book", "trip", "concert"])
        rows.append({"text": f"The {thing} was {rng.choice(good if positive else bad)}.",
                     "label": "positive" if positive else "negative"})
    return rows


if __name__ == "__main__":
    write("arithmetic_chat.jsonl", arithmetic_chat(600, 0))
    write("agent_gender_train.jsonl", agent_gender(400, 1))
    write("agent_gender_val.jsonl", agent_gender(200, 2))
    write("sentiment.jsonl", sentiment(40, 3))
    print("wrote", ", ".join(sorted(p.name for p in HERE.glob("*.jsonl"))))
