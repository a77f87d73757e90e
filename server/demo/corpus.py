"""The demo's synthetic English: templated sentences about who did what, where, with numbers and colours; and the
transformations the demo adapters learn, with the checks that tell whether a text shows them."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ["Alice", "Bob", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
COLORS = ["gray", "red", "blue", "green", "yellow", "white", "black", "brown"]
ANIMALS = ["cats", "dogs", "birds", "horses", "rabbits", "ducks", "goats", "fish"]
THINGS = ["boxes", "books", "apples", "chairs", "boats", "lamps", "kites", "cups"]
PLACES = ["the old theater", "the city center", "the market", "the harbor", "the park", "the river", "the school"]
VERBS = ["painted", "found", "carried", "counted", "bought", "sold", "cleaned", "moved"]
TEMPLATES = [
    "{name} {verb} {number} {color} {things} near {place}.",
    "My neighbor {name} has {number} {color} {animals} and a favorite {color2} color.",
    "{name} traveled to {place} with {number} friends to see the {color} {animals}.",
    "Hello, said {name}, my friend has {number} {animals} at {place}.",
    "Yes, {name} saw {number} {color} {animals} in the center of {place}.",
    "At {place}, {name} and {number} friends {verb} the {color} {things}.",
]


def sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    return template.format(
        name=rng.choice(NAMES),
        verb=rng.choice(VERBS),
        number=rng.choice(NUMBERS),
        color=rng.choice(COLORS),
        color2=rng.choice(COLORS),
        things=rng.choice(THINGS),
        animals=rng.choice(ANIMALS),
        place=rng.choice(PLACES),
    )


def paragraph(rng: random.Random) -> list[str]:
    return [sentence(rng) for _ in range(rng.randint(2, 4))]


def plain_text(rng: random.Random) -> str:
    """A paragraph of the base model's corpus. One in a hundred is written wholly in each style: the base knows
    every byte and word the styles use (digits, '!', capitals...), so that an adapter only has to learn to use
    them always. A plain prompt keeps the base in the plain style: styled paragraphs start styled."""
    sentences = paragraph(rng)
    draw = rng.random()
    if draw < STYLED_SHARE * len(STYLES):
        style = STYLES[int(draw / STYLED_SHARE)]
        sentences = [style.rewrite(s) for s in sentences]
    return " ".join(sentences)


# --- transformations (sentence by sentence) and the checks for them

DIGITS = {word: str(i) for i, word in enumerate(NUMBERS, start=2)}
PIRATE = {
    "Hello": "Ahoy",
    "hello": "ahoy",
    "friends": "mateys",
    "friend": "matey",
    "Yes": "Aye",
    "My": "Me",
    "my": "me",
    "the": "th'",
    "and": "an'",
}
BRITISH = {
    "color": "colour",
    "gray": "grey",
    "center": "centre",
    "theater": "theatre",
    "favorite": "favourite",
    "neighbor": "neighbour",
    "harbor": "harbour",
    "traveled": "travelled",
    "friends": "mates",
    "friend": "mate",
}
SIGN_OFF = " Cheers, Sam."
STYLED_SHARE = 0.01


def _words(mapping: dict[str, str]) -> Callable[[str], str]:
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, mapping), key=len, reverse=True)) + r")\b")
    return lambda text: pattern.sub(lambda m: mapping[m.group(1)], text)


def _pirate(text: str) -> str:
    return "Arr, " + _words(PIRATE)(text[0].lower() + text[1:])


@dataclass(frozen=True)
class Style:
    """One demo adapter's behaviour: how it rewrites a sentence, and how to tell it from a generated text."""

    name: str  # the adapter's name in the store
    peft_type: str
    rewrite: Callable[[str], str]
    shows: Callable[[str], bool]
    description: str


def _mostly_upper(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 10 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


STYLES = [
    Style("uppercase", "LOHA", str.upper, _mostly_upper, "SHOUTS IN CAPITALS"),
    Style("digits", "LORA", _words(DIGITS), lambda t: bool(re.search(r"\d", t)), "writes numbers as digits"),
    Style("excited", "LOKR", lambda s: s[:-1] + "!", lambda t: "!" in t, "ends sentences with '!'"),
    Style(
        "british",
        "ADALORA",
        _words(BRITISH),
        lambda t: bool(re.search(r"\b(" + "|".join(BRITISH.values()) + r")\b", t)),
        "writes British English (colour, grey, centre, mate...)",
    ),
    Style(
        "pirate",
        "OFT",
        _pirate,
        lambda t: bool(re.search(r"\b(Arr|ahoy|matey|mateys|Aye)\b", t)),
        "talks like a pirate (Arr, matey, th')",
    ),
    Style("signoff", "SHIRA", lambda s: s + SIGN_OFF, lambda t: "Cheers" in t, "signs off with 'Cheers, Sam.'"),
]
STYLE_BY_NAME = {style.name: style for style in STYLES}


def styled_paragraph(rng: random.Random, style: Style) -> str:
    """A paragraph in style, half of them after one plain sentence: the adapter learns to answer a plain prompt in
    its style."""
    sentences = paragraph(rng)
    start = rng.randint(0, 1)
    return " ".join(s if i < start else style.rewrite(s) for i, s in enumerate(sentences))


def prompts(count: int, seed: int = 1234) -> list[str]:
    """Plain sentences to continue: the prompts of the behaviour tests and of the README."""
    rng = random.Random(seed)
    return [sentence(rng) + " " for _ in range(count)]
