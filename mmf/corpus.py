"""The embedded default corpus: short English stories from a small probabilistic grammar.

``mmf train`` with no data trains on text that this module writes at run time, so a first run
needs no download and no data licence. The grammar is deliberately small (a few hundred words,
about twenty sentence templates, dialogue and punctuation) so that a model of a few million
parameters learns it on two CPU cores in minutes, yet rich enough that what the model samples
is plainly English-like and easy to compare with the corpus by eye.

The text is a pure function of ``(seed, n_bytes)``: the same seed gives the same bytes on every
machine and Python version (only ``random.Random`` with integer seeding and ``choice`` /
``random`` / ``randint`` are used, whose sequences Python keeps stable).

Each story is one line, followed by a blank line (so the data pipeline reads each story as one
document), e.g.::

    Once upon a time, there was a little fox named Lily. Every morning, Lily walked to the river.
    She saw a shiny stone near the old bridge. "Look at this!" said Lily. ...
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

CORPUS_NAME = "grammar"  # how configs and metadata name this corpus
CORPUS_VERSION = 1  # bump when the grammar changes, so cached token files are rebuilt

NAMES_F = ["Lily", "Anna", "Mia", "Sara", "Emma", "Zoe", "Nora", "Ruby", "Lucy", "Ella", "Maya", "Rosa"]
NAMES_M = ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Omar", "Theo", "Hugo", "Noah", "Eli"]
ANIMALS = ["fox", "rabbit", "bear", "cat", "dog", "bird", "mouse", "owl", "frog", "duck", "horse", "goat",
           "squirrel", "turtle", "lion", "wolf"]
PEOPLE = ["girl", "boy", "farmer", "teacher", "baker", "king", "queen", "sailor", "doctor", "painter"]
OBJECTS = ["ball", "box", "hat", "book", "stone", "apple", "cake", "kite", "key", "boat", "lamp", "cup",
           "letter", "flower", "shell", "coin", "map", "drum", "basket", "ribbon", "feather", "bell"]
PLACES = ["river", "forest", "market", "garden", "hill", "beach", "village", "farm", "park", "school",
          "castle", "lake", "bridge", "field", "kitchen", "library"]
ADJ_SIZE = ["little", "big", "small", "tiny", "huge", "tall"]
ADJ_COLOUR = ["red", "blue", "green", "yellow", "brown", "white", "golden", "purple"]
ADJ_QUALITY = ["old", "new", "shiny", "soft", "heavy", "strange", "pretty", "broken", "warm", "secret"]
ADJ_FEELING = ["happy", "sad", "tired", "hungry", "brave", "scared", "curious", "sleepy", "proud", "angry"]
V_SEE = ["saw", "found", "noticed", "picked up", "carried", "dropped", "painted", "hid", "shared", "lost"]
V_MOVE = ["walked", "ran", "went", "hurried", "skipped", "wandered", "climbed", "flew", "swam", "drove"]
V_DO = ["laughed", "sang", "smiled", "slept", "danced", "cried", "waited", "listened", "played", "shouted"]
ADVERBS = ["slowly", "quickly", "quietly", "happily", "carefully", "suddenly", "softly", "loudly"]
TIMES = ["Every morning", "One day", "Later that day", "After lunch", "In the evening", "That night",
         "The next day", "Before dinner", "On Sunday", "At sunrise"]
WEATHER = ["the sun was warm", "it was raining", "the wind was cold", "the sky was blue", "snow was falling",
           "the stars were bright"]
SAY = ["said", "asked", "cried", "whispered", "shouted", "replied"]
QUESTIONS = ["Where is my {obj}?", "Can I play with you?", "What is in the {obj}?", "Do you like my {obj}?",
             "Who lives by the {place}?", "Why are you so {feel}?", "Shall we go to the {place}?"]
EXCLAIMS = ["Look at this {obj}!", "What a {adj} {obj}!", "I am so {feel}!", "Let us go to the {place}!",
            "Thank you, {friend}!", "This is the best day ever!"]


class _Story:
    """One story: a hero, a friend and a few sentences from the templates."""

    def __init__(self, rng: random.Random):
        self.r = rng
        female = rng.random() < 0.5
        self.name = rng.choice(NAMES_F if female else NAMES_M)
        self.pron, self.poss = ("she", "her") if female else ("he", "his")
        self.kind = rng.choice(ANIMALS + PEOPLE)
        friend_female = rng.random() < 0.5
        self.friend = rng.choice([n for n in (NAMES_F if friend_female else NAMES_M) if n != self.name])
        self.friend_kind = rng.choice(ANIMALS)

    # --- phrases -------------------------------------------------------------------------------
    def adj(self) -> str:
        return self.r.choice(self.r.choice([ADJ_SIZE, ADJ_COLOUR, ADJ_QUALITY]))

    def obj(self, det: str | None = None) -> str:
        r = self.r
        det = det or r.choice(["a", "the", "a", self.poss])
        words = [self.adj()] if r.random() < 0.6 else []
        if words and r.random() < 0.25:
            words.append(r.choice(ADJ_COLOUR))
        noun = r.choice(OBJECTS)
        phrase = " ".join(words + [noun])
        if det == "a" and phrase[0] in "aeiou":
            det = "an"
        return f"{det} {phrase}"

    def place(self) -> str:
        r = self.r
        if r.random() < 0.4:
            return f"the {r.choice(ADJ_SIZE + ADJ_QUALITY)} {r.choice(PLACES)}"
        return f"the {r.choice(PLACES)}"

    def subject(self) -> str:
        r = self.r
        x = r.random()
        if x < 0.45:
            return self.name
        if x < 0.75:
            return self.pron
        if x < 0.9:
            return f"{self.name} and {self.friend}"
        return f"the {self.friend_kind}"

    def fill(self, template: str) -> str:
        r = self.r
        return template.format(obj=r.choice(OBJECTS), place=r.choice(PLACES), feel=r.choice(ADJ_FEELING),
                               adj=self.adj(), friend=self.friend)

    # --- sentences -----------------------------------------------------------------------------
    def sentence(self) -> str:
        r = self.r
        subj = self.subject()
        plural = " and " in subj
        be = "were" if plural else "was"
        t = r.randrange(14)
        if t == 0:
            s = f"{subj} {r.choice(V_SEE)} {self.obj()} near {self.place()}."
        elif t == 1:
            s = f"{r.choice(TIMES)}, {subj} {r.choice(V_MOVE)} to {self.place()}."
        elif t == 2:
            s = f"{subj} {be} {r.choice(ADJ_FEELING)} because {r.choice(WEATHER)}."
        elif t == 3:
            q = self.fill(r.choice(QUESTIONS))
            s = f"\"{q}\" {r.choice(SAY[:2] + SAY[3:])} {self.name}."
        elif t == 4:
            e = self.fill(r.choice(EXCLAIMS))
            s = f"\"{e}\" said {r.choice([self.name, self.friend])}."
        elif t == 5:
            s = f"{subj} {r.choice(V_SEE)} {self.obj()}, and then {self.pron} {r.choice(V_DO)} {r.choice(ADVERBS)}."
        elif t == 6:
            s = f"The {r.choice(ANIMALS)} {r.choice(V_DO)} {r.choice(ADVERBS)} in {self.place()}."
        elif t == 7:
            s = f"{subj} gave {self.obj('a')} to {self.friend}."
        elif t == 8:
            partner = "together" if plural else f"with {self.friend}"
            s = f"When {r.choice(WEATHER)}, {subj} {r.choice(V_DO)} {partner}."
        elif t == 9:
            s = f"{subj} {r.choice(V_MOVE)} {r.choice(ADVERBS)} past {self.place()}, but {self.pron} did not stop."
        elif t == 10:
            n = r.choice(["two", "three", "four", "five", "many"])
            s = f"There were {n} {r.choice(OBJECTS)}s in {self.place()}."
        elif t == 11:
            s = f"{subj} {be} very {r.choice(ADJ_FEELING)}, so {self.pron} {r.choice(V_DO)}."
        elif t == 12:
            s = f"{subj} looked at {self.obj('the')} and {r.choice(V_DO)}."
        else:
            s = f"{self.friend} {r.choice(SAY[:1] + SAY[5:])}, \"I will help you, {self.name}.\""
        return s[0].upper() + s[1:]

    def text(self) -> str:
        r = self.r
        article = "an" if self.kind[0] in "aeiou" else "a"
        opening = r.choice([
            f"Once upon a time, there was {article} {self.kind} named {self.name}.",
            f"{self.name} was {article} {r.choice(ADJ_SIZE + ADJ_FEELING)} {self.kind} who lived near {self.place()}.",
            f"In a {r.choice(ADJ_SIZE)} village, there lived {article} {self.kind} called {self.name}.",
        ])
        body = [self.sentence() for _ in range(r.randint(3, 7))]
        ending = r.choice([
            f"In the end, {self.name} was very {r.choice(['happy', 'proud', 'tired', 'glad'])}.",
            f"From that day on, {self.name} and {self.friend} were best friends.",
            f"That night, {self.name} went to sleep with a smile.",
            "The end.",
        ])
        return " ".join([opening, *body, ending])


def iter_stories(seed: int = 0) -> Iterator[str]:
    """An endless, deterministic stream of stories (one line each, no trailing newline)."""
    rng = random.Random(seed)
    while True:
        yield _Story(rng).text()


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> int:
    """Write whole stories, one per line with a blank line between them (so each is one document),
    until at least ``n_bytes`` bytes; returns the size written."""
    path = Path(path)
    written = 0
    buf: list[str] = []
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for story in iter_stories(seed):
            line = story + "\n\n"
            buf.append(line)
            written += len(line.encode("utf-8"))
            if len(buf) >= 2048:
                f.write("".join(buf))
                buf.clear()
            if written >= n_bytes:
                break
        f.write("".join(buf))
    return written
