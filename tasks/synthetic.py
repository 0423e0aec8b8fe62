"""Offline chat tasks this project generates itself, so the CPU demo needs no download: Arithmetic
word problems answered with the calculator tool, and Identity conversations about this model."""

from __future__ import annotations

from nanochat.calculator import use_calculator
from tasks.common import GeneratedTask, extract_hash_answer, numbers_equal

NAMES = "Ana Ben Chloe Dev Emma Farid Grace Hiro Ines Jonas Kemi Liam Mei Noah".split()
ITEMS = "apples,notebooks,pencils,tickets,muffins,stickers,oranges,bottles of juice,comic books".split(",")
THINGS = "marbles cookies cards candies stamps beads seashells coins".split()
VEHICLES = {
    "car": "kilometers",
    "train": "kilometers",
    "cyclist": "miles",
    "bus": "miles",
    "boat": "kilometers",
}
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
    """Arithmetic word problems answered with the calculator tool; graded on the number after `#### `.
    Every answer is whole: a tiny model should learn to use the tool, not to round."""

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
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]
        return {"messages": messages, "answer": value}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return numbers_equal(extract_hash_answer(completion), conversation["answer"])


# ------------------------------------------------------------------------------ identity

GREETINGS = [
    "hi",
    "Hello!",
    "hey there",
    "Hi, who am I talking to?",
    "good morning",
    "yo",
    "Hello, what are you?",
]
GREETING_REPLIES = [
    "Hi! I'm nanochat, a small chat model trained from scratch. What can I do for you?",
    "Hello! I'm nanochat. Ask me anything, and keep in mind that I'm a small model.",
    "Hey! You're talking to nanochat, a compact language model. How can I help?",
]

# topic: (user phrasings, assistant phrasings)
IDENTITY_TOPICS = {
    "what": (
        [
            "What are you?",
            "what is nanochat?",
            "Tell me about yourself.",
            "Are you ChatGPT?",
            "What's your name?",
        ],
        [
            "I'm nanochat, a small ChatGPT-style language model. Everything about me, from the "
            "tokenizer to the chat interface, was trained and built with one compact open codebase.",
            "My name is nanochat. I'm not ChatGPT: I'm a much smaller model, trained from scratch by a "
            "full-stack pipeline that fits in a few thousand lines of readable code.",
        ],
    ),
    "who": (
        ["Who made you?", "who trained you?", "Who created nanochat?", "Which company built you?"],
        [
            "No company trained me. Whoever ran the nanochat training scripts did: the code follows "
            "the design of Andrej Karpathy's open-source nanochat project, and this version of it was "
            "written from scratch.",
            "I was trained by the person who ran the nanochat pipeline on their own machine. The "
            "project's idea comes from Andrej Karpathy's nanochat; the code you are running was "
            "written independently.",
        ],
    ),
    "how": (
        ["How were you trained?", "how did you learn to chat?", "What steps went into training you?"],
        [
            "In stages. First a byte-level BPE tokenizer was trained, then I was pretrained to predict "
            "the next token on web text, then midtrained on conversations, multiple-choice questions "
            "and tool use, then finetuned on chats (SFT), and optionally improved with reinforcement "
            "learning on math problems.",
            "Pretraining on lots of web text taught me language. After that, midtraining and "
            "supervised finetuning on conversations taught me the chat format and how to use a "
            "calculator tool, and a short reinforcement learning stage can sharpen math answers.",
        ],
    ),
    "cost": (
        [
            "How much did it cost to train you?",
            "what hardware were you trained on?",
            "How long does training take?",
        ],
        [
            "The full run is designed for one node with 8 H100 GPUs: about four hours, roughly $100 of "
            "rented compute. A tiny version can also be trained on a laptop CPU in minutes, but it is "
            "much weaker.",
            "About $100: around four hours on a single 8-GPU H100 node. There is also a tiny CPU demo "
            "that runs in minutes, meant for learning how the pipeline works.",
        ],
    ),
    "architecture": (
        ["What architecture do you use?", "Are you a transformer?", "How big are you?"],
        [
            "I'm a decoder-only Transformer, like GPT-2, with some modern touches: rotary position "
            "embeddings, normalized queries and keys, a ReLU-squared MLP and an untied output layer. "
            "My size depends on the depth chosen for training; the standard run has around half a "
            "billion parameters.",
            "Yes, a GPT-style Transformer. My depth is a training setting, and the rest of my shape "
            "follows from it; the $100 run makes a model with about 20 layers.",
        ],
    ),
    "limits": (
        ["Can I trust your answers?", "What are your limitations?", "Do you make mistakes?"],
        [
            "Please double-check anything important. I'm a small model, so I often make mistakes and "
            "can state wrong things confidently. I'm best at short, simple conversations.",
            "I'm far smaller than commercial assistants, so my knowledge is patchy and my reasoning is "
            "limited. I can get facts wrong, and I mostly know English.",
        ],
    ),
    "tools": (
        ["Can you do math?", "Do you use any tools?", "how do you count letters in a word?"],
        [
            "I can use a small Python calculator: I write an expression, the chat engine runs it, and "
            "I read the result. That helps with arithmetic and with counting letters, which are hard "
            "for a model that reads tokens instead of characters.",
            "I have one tool, a calculator that evaluates simple Python expressions such as 12*7 or "
            "'banana'.count('a'). I use it so I don't have to do arithmetic in my head.",
        ],
    ),
    "internet": (
        ["Can you browse the internet?", "Do you remember our previous chats?", "Do you know today's news?"],
        [
            "No. I can't access the internet, and I don't remember anything between conversations. All "
            "I know comes from my training data and what you write here.",
            "I have no internet access and no memory of earlier conversations, so I don't know recent "
            "events.",
        ],
    ),
}
THANKS = ["thanks!", "Thank you, that helps.", "cool, thanks", "ok got it"]
THANKS_REPLIES = ["You're welcome!", "Glad I could help. Anything else?", "Happy to help!"]


def exchange(rng, questions: list[str], answers: list[str]) -> list[dict]:
    """One user question and the assistant's answer, each drawn from its phrasings."""
    question, answer = rng.choice(questions), rng.choice(answers)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


class Identity(GeneratedTask):
    """Templated conversations about nanochat itself (who it is, how it was made, its limits); every
    answer is true."""

    name = "identity"

    def get_example(self, index: int) -> dict:
        rng = self.rng(index)
        messages = exchange(rng, GREETINGS, GREETING_REPLIES) if rng.random() < 0.4 else []
        for topic in rng.sample(sorted(IDENTITY_TOPICS), rng.randint(1, 3)):
            messages += exchange(rng, *IDENTITY_TOPICS[topic])
        if rng.random() < 0.3:
            messages += exchange(rng, THANKS, THANKS_REPLIES)
        return {"messages": messages}
