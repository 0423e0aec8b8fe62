"""Offline chat tasks this project generates itself, so the CPU demo needs no download: Arithmetic
word problems answered with the calculator tool, and Identity conversations about this model (their
phrasings in identity.json)."""

import json
from pathlib import Path

from nanochat.calculator import use_calculator
from tasks.common import GeneratedTask, qa_messages

NAMES = "Ana Ben Chloe Dev Emma Farid Grace Hiro Ines Jonas Kemi Liam Mei Noah".split()
ITEMS = "apples,notebooks,pencils,tickets,muffins,stickers,oranges,bottles of juice,comic books".split(",")
THINGS = "marbles cookies cards candies stamps beads seashells coins".split()
VEHICLES = dict(car="kilometers", train="kilometers", cyclist="miles", bus="miles", boat="kilometers")
PLACES = ["garden", "room", "field", "parking lot", "playground", "kitchen floor"]


# Each problem maker returns (question, steps, closing): steps are (text before, expression)
# pairs, and an expression may refer to the previous result as {prev}.


def _shopping(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    n, price = rng.randint(2, 12), rng.randint(1, 25)
    questions = [
        f"{name} buys {n} {item} at ${price} each. How much does {name} spend?",
        f"One of the {item} costs ${price}. What do {n} of them cost?",
        f"{name} needs {n} {item}. Each costs ${price}. How many dollars is that in total?",
    ]
    question = rng.choice(questions)
    return question, [(f"The total cost is {n} times ${price}:", f"{n}*{price}")], "dollars in total"


def _change(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    n, price = rng.randint(2, 6), rng.randint(1, 8)
    bill = next(b for b in (10, 20, 50, 100) if b > n * price)
    question = f"{name} buys {n} {item} for ${price} each and pays with a ${bill} bill. "
    question += f"How much change does {name} get?"
    steps = [
        (f"First the cost of the {item}:", f"{n}*{price}"),
        (f"\nThen the change from ${bill}:", f"{bill}-{{prev}}"),
    ]
    return question, steps, "dollars of change"


def _sharing(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    questions = [
        f"{name} has {total} {thing} and shares them equally among {friends} friends. How many does each "
        "friend get?",
        f"{total} {thing} are split evenly into {friends} bags. How many {thing} go in each bag?",
    ]
    question = rng.choice(questions)
    steps = [(f"Divide the {total} {thing} into {friends} equal shares:", f"{total}/{friends}")]
    return question, steps, "each"


def _distance(rng):
    vehicle, unit = rng.choice(list(VEHICLES.items()))
    speed, hours = rng.randint(10, 90), rng.randint(2, 8)
    question = f"A {vehicle} travels at {speed} {unit} per hour for {hours} hours. How far does it go?"
    return question, [("Distance is speed times time:", f"{speed}*{hours}")], unit


def _savings(rng):
    name = rng.choice(NAMES)
    start, weekly, weeks = rng.randint(0, 60), rng.randint(3, 30), rng.randint(2, 12)
    question = f"{name} has ${start} and saves ${weekly} every week. "
    question += f"How much money does {name} have after {weeks} weeks?"
    steps = [(f"Start with ${start} and add {weeks} weeks of ${weekly}:", f"{start}+{weekly}*{weeks}")]
    return question, steps, "dollars"


def _remaining(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    have, gave = rng.randint(20, 90), rng.randint(1, 19)
    bought = rng.randint(1, 30)
    question = f"{name} had {have} {thing}, gave away {gave}, then got {bought} more. "
    question += f"How many {thing} does {name} have now?"
    return question, [("Take away what was given, add what was received:", f"{have}-{gave}+{bought}")], thing


def _area(rng):
    place = rng.choice(PLACES)
    length, width = rng.randint(3, 40), rng.randint(2, 25)
    question = f"A rectangular {place} is {length} meters long and {width} meters wide. "
    question += "What is its area in square meters?"
    steps = [("The area of a rectangle is length times width:", f"{length}*{width}")]
    return question, steps, "square meters"


def _discount(rng):
    item = rng.choice(["jacket", "bike", "lamp", "backpack", "pair of shoes", "board game"])
    percent = rng.choice([10, 20, 25, 50])
    price = rng.randint(2, 30) * 20  # a multiple of 20: every discount is whole dollars
    question = f"A {item} costs ${price} and is on sale for {percent}% off. "
    question += "What is the sale price in dollars?"
    steps = [(f"The sale price is the price minus {percent}% of it:", f"{price}-{price}*{percent}/100")]
    return question, steps, "dollars"


def _packs(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    packs, per_pack = rng.randint(2, 9), rng.randint(3, 12)
    used = rng.randint(1, packs * per_pack - 1)
    question = f"{name} buys {packs} packs of {thing} with {per_pack} in each pack and gives {used} of them "
    question += f"to a friend. How many {thing} are left?"
    steps = [
        ("First the number bought:", f"{packs}*{per_pack}"),
        (f"\nThen subtract the {used} given away:", f"{{prev}}-{used}"),
    ]
    return question, steps, f"{thing} left"


def _bare(rng):
    a, b = rng.randint(11, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    question = rng.choice([f"What is {a} {op} {b}?", f"Calculate {a}{op}{b}.", f"{a} {op} {b} = ?"])
    return question, [("Let me compute it:", f"{a}{op}{b}")], ""


PROBLEMS = [_shopping, _change, _sharing, _distance, _savings, _remaining, _area, _discount, _packs, _bare]


class Arithmetic(GeneratedTask):
    """Word problems solved with the calculator tool, every answer whole: learn the tool, not rounding."""

    name = "arithmetic"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        question, steps, closing = rng.choice(PROBLEMS)(rng)
        parts, value = [], None
        for lead, template in steps:
            expr = template.format(prev=value)
            value = use_calculator(expr)  # the engine's own tool writes the output the model will read
            parts.append({"type": "text", "text": lead + " "})
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": value})
        closing = f" {closing}" if closing else ""
        parts.append({"type": "text", "text": f"\n\nSo the answer is {value}{closing}.\n\n#### {value}"})
        return {"messages": qa_messages(question, parts), "answer": value}


# ------------------------------------------------------------------------------ identity

# what users ask and true answers, as phrasings of a greeting, of each topic and of thanks
IDENTITY = json.loads(Path(__file__).with_name("identity.json").read_text(encoding="utf-8"))


def exchange(rng, phrasings: dict) -> list[dict]:
    """One user question and the assistant's answer, each drawn from its phrasings."""
    return qa_messages(rng.choice(phrasings["user"]), rng.choice(phrasings["assistant"]))


class Identity(GeneratedTask):
    """Templated, true conversations about nanochat itself (who it is, how it was made, its limits)."""

    name = "identity"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        messages = exchange(rng, IDENTITY["greeting"]) if rng.random() < 0.4 else []
        for topic in rng.sample(sorted(IDENTITY["topics"]), rng.randint(1, 3)):
            messages += exchange(rng, IDENTITY["topics"][topic])
        if rng.random() < 0.3:
            messages += exchange(rng, IDENTITY["thanks"])
        return {"messages": messages}
