"""Generate the synthetic demo corpus and its tokenizer under data/demo/.

Why: the CPU demo must train a teacher in minutes and still leave a student something to learn
from the teacher's distributions. So the corpus mixes tasks that reward capacity (memorising a
fixed invented world of people, cities and jobs; arithmetic; reversing and spelling words; sorting)
with tasks whose answers are genuinely ambiguous ("name someone who lives in Vodadu"), where the
teacher's distribution is spread over many right answers instead of being one-hot.
Nothing is downloaded; everything comes from one seeded `random.Random`, so the outputs are
byte-identical on every run:

    python data/make_demo.py            # writes data/demo/{train,heldout}.jsonl and data/demo/tokenizer/

Held-out examples are new instances of the same tasks: unseen number pairs and lists, unseen words,
and questions about the same (memorised) facts in phrasings never used in training.
Sizes and token counts are in data/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

# Run as a plain script from the repository root, so put the repo on the path for `pipeline`.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.bpe_tokenizer import train_tokenizer  # noqa: E402

SEED = 1234
N_PEOPLE = 150
N_CITIES = 12
VOCAB_SIZE = 512
MAX_TOKENS = 64  # per example, chat template included; checked below

JOBS = ["baker", "doctor", "farmer", "painter", "teacher", "pilot", "tailor", "miner",
        "sailor", "potter", "singer", "judge", "nurse", "clerk", "smith"]
PETS = ["cat", "dog", "parrot", "goat", "rabbit", "turtle", "horse", "hen"]
WORDS = """
apple river stone cloud garden window candle forest silver bridge pocket rabbit button
orange castle summer winter basket pencil ladder mirror helmet jacket kettle lemon marble
needle oyster pepper puzzle saddle tunnel velvet wagon yellow anchor barrel copper dragon
engine feather goblet hammer island jungle kitten lantern meadow napkin orchid parrot quiver
rocket shadow ticket umbrella violin walnut zipper blanket carpet desert falcon glacier harbor
insect jewel lizard magnet nectar object planet quartz saucer timber valley whistle almond
beacon cactus dolphin ember fossil gravel hollow iceberg jigsaw kernel locket mustard nozzle
oven pillow quill ribbon spoon thimble urchin vessel willow yogurt zebra bottle cherry dagger
eagle fabric ginger hazel ivory juggle kayak lemur muffin noodle otter pebble rascal sponge
tulip uncle vapor wizard yarn acorn bramble cobalt dune echo fern grape honey igloo jasmine
koala lily mango nutmeg olive panda quail robin sugar tiger unicorn viper walrus bison comet
daisy flint gecko hippo iris
""".split()


# ---- the invented world ---------------------------------------------------------------------

def invent_names(rng: random.Random, n: int, syllables: int) -> list[str]:
    """`n` distinct pronounceable capitalised names of `syllables` consonant-vowel syllables."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(syllables)).capitalize()
        if name not in names:
            names.append(name)
    return names


def build_world(rng: random.Random) -> list[dict[str, str]]:
    """The people of the demo world, each with a city, a job and a pet (facts to memorise)."""
    cities = invent_names(rng, N_CITIES, 3)
    firsts = invent_names(rng, N_PEOPLE, 2)
    lasts = invent_names(rng, N_PEOPLE, 2)
    return [
        {"name": f"{first} {last}", "city": rng.choice(cities), "job": rng.choice(JOBS),
         "pet": rng.choice(PETS)}
        for first, last in zip(firsts, lasts)
    ]


# Question phrasings per attribute: training uses the first list, held-out the second, so a held-out
# fact question is a memorised fact asked in words the model never saw it asked in.
FACT_TEMPLATES = {
    "city": (["Where does {name} live?", "Which city is {name} from?", "What is {name}'s home town?"],
             ["In which city does {name} live?", "{name} lives in which city?"]),
    "job": (["What does {name} do?", "What is {name}'s job?", "What work does {name} do?"],
            ["What is the occupation of {name}?", "{name} works as what?"]),
    "pet": (["What pet does {name} have?", "Which animal does {name} keep?", "What is {name}'s pet?"],
            ["What kind of pet does {name} own?", "{name} keeps which animal?"]),
}
# Two answer styles on purpose: the first answer token is then a real two-way choice.
FACT_ANSWERS = {
    "city": ["{city}.", "{name} lives in {city}."],
    "job": ["A {job}.", "{name} is a {job}."],
    "pet": ["A {pet}.", "{name} has a {pet}."],
}


def fact_example(rng: random.Random, person: dict[str, str], attr: str, split: int) -> dict[str, str]:
    """One question about one attribute of `person`; `split` 0 = training phrasings, 1 = held-out."""
    prompt = rng.choice(FACT_TEMPLATES[attr][split]).format(**person)
    return {"prompt": prompt, "response": rng.choice(FACT_ANSWERS[attr]).format(**person)}


def bio_example(rng: random.Random, person: dict[str, str]) -> dict[str, str]:
    """A whole-person description, so all of a person's facts also appear together."""
    prompt = rng.choice(["Tell me about {name}.", "Who is {name}?"]).format(**person)
    return {"prompt": prompt, "response": "{name} is a {job} in {city} and has a {pet}.".format(**person)}


def group_example(rng: random.Random, world: list[dict[str, str]]) -> dict[str, str]:
    """An ambiguous question: any person with the asked city or job is a right answer."""
    attr = rng.choice(["city", "job"])
    value = rng.choice(world)[attr]
    answers = [p["name"] for p in world if p[attr] == value]
    prompt = f"Name someone who lives in {value}." if attr == "city" else f"Name a {value}."
    return {"prompt": prompt, "response": rng.choice(answers) + "."}


# ---- procedural tasks -----------------------------------------------------------------------

def arithmetic_example(rng: random.Random, a: int, b: int) -> dict[str, str]:
    """Addition or subtraction of two numbers below 100."""
    if rng.random() < 0.5:
        return {"prompt": f"What is {a} + {b}?", "response": str(a + b)}
    a, b = max(a, b), min(a, b)  # keep results non-negative
    return {"prompt": f"What is {a} - {b}?", "response": str(a - b)}


def compare_example(rng: random.Random, a: int, b: int) -> dict[str, str]:
    """Which of two different numbers is larger or smaller."""
    if rng.random() < 0.5:
        return {"prompt": f"Which is larger, {a} or {b}?", "response": str(max(a, b))}
    return {"prompt": f"Which is smaller, {a} or {b}?", "response": str(min(a, b))}


def sort_example(rng: random.Random, nums: list[int]) -> dict[str, str]:
    """Sort three to five numbers, ascending or descending."""
    if rng.random() < 0.7:
        return {"prompt": "Sort: " + " ".join(map(str, nums)), "response": " ".join(map(str, sorted(nums)))}
    return {"prompt": "Sort descending: " + " ".join(map(str, nums)),
            "response": " ".join(map(str, sorted(nums, reverse=True)))}


def word_example(rng: random.Random, word: str) -> dict[str, str]:
    """Reverse, spell or count the letters of a word."""
    kind = rng.choice(["reverse", "spell", "count"])
    if kind == "reverse":
        return {"prompt": f"Reverse the word {word}.", "response": word[::-1]}
    if kind == "spell":
        return {"prompt": f"Spell {word}.", "response": "-".join(word)}
    return {"prompt": f"How many letters are in {word}?", "response": str(len(word))}


def pick_example(rng: random.Random) -> dict[str, str]:
    """An open choice (any even number, any pet): the teacher's answer is a wide distribution."""
    lo = rng.randrange(0, 80, 10)
    if rng.random() < 0.5:
        return {"prompt": f"Give an even number between {lo} and {lo + 20}.",
                "response": str(rng.randrange(lo + 2, lo + 20, 2))}
    return {"prompt": "Name an animal someone could keep as a pet.", "response": f"A {rng.choice(PETS)}."}


# ---- splits ---------------------------------------------------------------------------------

def split_pairs(rng: random.Random, n_heldout: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All ordered pairs of numbers below 100, shuffled; the first `n_heldout` are never trained on."""
    pairs = [(a, b) for a in range(100) for b in range(100) if a != b]
    rng.shuffle(pairs)
    return pairs[n_heldout:], pairs[:n_heldout]


def make_splits(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Build the training and held-out examples (each shuffled)."""
    world = build_world(rng)
    words = WORDS[:]
    rng.shuffle(words)
    heldout_words, train_words = words[:30], words[30:]
    train_pairs, heldout_pairs = split_pairs(rng, 400)
    heldout_sorts = {tuple(rng.sample(range(100), rng.randint(3, 5))) for _ in range(60)}

    train: list[dict[str, str]] = []
    for person in world:  # every fact is asked several times, so it can be memorised
        for attr in FACT_TEMPLATES:
            train += [fact_example(rng, person, attr, 0) for _ in range(4)]
        train += [bio_example(rng, person) for _ in range(2)]
    train += [group_example(rng, world) for _ in range(400)]
    train += [arithmetic_example(rng, *train_pairs[i]) for i in range(1400)]
    train += [compare_example(rng, *train_pairs[1400 + i]) for i in range(300)]
    while sum(1 for e in train if e["prompt"].startswith("Sort")) < 800:
        nums = rng.sample(range(100), rng.randint(3, 5))
        if tuple(nums) not in heldout_sorts:
            train.append(sort_example(rng, nums))
    train += [word_example(rng, rng.choice(train_words)) for _ in range(900)]
    train += [pick_example(rng) for _ in range(200)]

    heldout: list[dict[str, str]] = []
    for person in rng.sample(world, 60):
        heldout += [fact_example(rng, person, attr, 1) for attr in FACT_TEMPLATES]
    heldout += [group_example(rng, world) for _ in range(20)]
    heldout += [arithmetic_example(rng, *heldout_pairs[i]) for i in range(80)]
    heldout += [compare_example(rng, *heldout_pairs[80 + i]) for i in range(20)]
    heldout += [sort_example(rng, list(nums)) for nums in sorted(heldout_sorts)[:50]]
    heldout += [word_example(rng, rng.choice(heldout_words)) for _ in range(60)]
    heldout += [pick_example(rng) for _ in range(10)]

    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


# ---- output ---------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write one JSON object per line, keys sorted, so the bytes depend only on the rows."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def chat_text(row: dict[str, str]) -> list[dict[str, str]]:
    """The example as chat messages."""
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def token_counts(tok, rows: list[dict[str, str]]) -> list[int]:
    """Tokens per example in the chat format a student sees: <|user|>p<|eos|><|assistant|>r<|eos|>."""
    return [len(tok(tok.apply_chat_template(chat_text(r), tokenize=False))["input_ids"]) for r in rows]


def main() -> None:
    """Generate the splits, train the tokenizer on the training split, check lengths, write all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "demo")
    args = parser.parse_args()

    train, heldout = make_splits(random.Random(SEED))
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    texts = [text for row in train for text in (row["prompt"], row["response"])]
    tok = train_tokenizer(texts, args.out / "tokenizer", vocab_size=VOCAB_SIZE)

    for name, rows in (("train", train), ("heldout", heldout)):
        counts = token_counts(tok, rows)
        if max(counts) > MAX_TOKENS:
            raise SystemExit(f"{name}: an example has {max(counts)} tokens > {MAX_TOKENS}")
        print(f"{name}: {len(rows)} examples, {sum(counts)} tokens, "
              f"tokens/example mean {statistics.mean(counts):.1f} max {max(counts)}")
    print(f"tokenizer: {len(tok)} tokens -> {args.out / 'tokenizer'}")


if __name__ == "__main__":
    main()
