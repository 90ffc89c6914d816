"""A seeded grammar of short children's stories over labelled concept vocabularies.

The grammar is built so that the concept categories matter for next-token
prediction, which is what lets a later study ask whether SAE latents recover them:

- copying: each story fixes a cast (a hero, a friend, a coloured animal, a
  place, ...) and keeps referring back to it, so later mentions are predictable
  from earlier ones (names, colour + animal pairs, places);
- agreement: pronouns follow the hero's gender (she/her vs he/his);
- category slots: "On <day>", "It was <weather>", "felt <emotion>",
  "<number> <plural food/animal>", "<action> to the <place>", "a <tool>" -- the
  context fixes the category of the next word even when the word itself is free.

Streams: every text comes from a `random.Random` seeded with a string such as
"tinylm/train/0". String seeds are hashed with SHA-512, so streams are
reproducible across processes and the train, validation and harvest streams
are independent of one another. The story space is astronomically larger than
any corpus here, so independent streams give disjoint texts in practice (the
tests check this).
"""

import random

NAMES_FEMALE = ("Alice", "Emma", "Lily", "Sara", "Mia", "Anna", "Lucy", "Kate", "Rose")
NAMES_MALE = ("Tom", "Sam", "Ben", "Max", "Jack", "Leo", "Jim", "Dan", "Paul")

CONCEPTS: dict[str, tuple[str, ...]] = {
    "names": NAMES_FEMALE + NAMES_MALE,
    "animals": ("cat", "dog", "bird", "frog", "duck", "horse", "cow", "pig", "rabbit",
                "goat", "hen", "bear", "lamb", "owl"),
    "colours": ("red", "blue", "green", "yellow", "white", "black", "brown", "pink",
                "purple", "orange", "grey", "gold"),
    "places": ("park", "forest", "river", "beach", "farm", "garden", "school", "market",
               "lake", "hill", "village", "castle", "library", "field"),
    "foods": ("apple", "cake", "pie", "cookie", "egg", "bun", "plum", "pear", "grape",
              "carrot", "muffin", "lemon", "peach", "cherry"),
    "emotions": ("happy", "sad", "angry", "scared", "proud", "tired", "excited", "calm",
                 "lonely", "surprised", "worried", "glad", "nervous", "cheerful"),
    "numbers": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"),
    "actions": ("ran", "walked", "jumped", "hopped", "raced", "crawled", "danced",
                "rushed", "wandered", "marched", "skipped", "rolled", "climbed", "swam"),
    # Capitalised like names: that is how English writes them.
    "days": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "weather": ("sunny", "rainy", "windy", "cloudy", "snowy", "foggy", "stormy", "cold",
                "warm", "hot", "frosty", "chilly"),
    "tools": ("hammer", "shovel", "rope", "ladder", "bucket", "brush", "net", "spoon",
              "basket", "key", "lamp", "broom"),
    "people": ("mother", "father", "sister", "brother", "grandma", "grandpa", "teacher",
               "farmer", "baker", "doctor", "neighbour", "uncle"),
}

_STREAMS = ("train", "val", "harvest")


def word_concepts() -> dict[str, str]:
    """Map every concept word to its category."""
    return {w: cat for cat, words in CONCEPTS.items() for w in words}


def _plural(noun: str) -> str:
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("ch", "sh", "s", "x")):
        return noun + "es"
    return noun + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random) -> str:
    c = CONCEPTS
    pick = rng.choice
    female = rng.random() < 0.5
    hero = pick(NAMES_FEMALE if female else NAMES_MALE)
    friend = pick([n for n in c["names"] if n != hero])
    she, her = ("she", "her") if female else ("he", "his")
    She = she.capitalize()
    # The story's cast: later sentences copy these back.
    animal, colour, place, food = pick(c["animals"]), pick(c["colours"]), pick(c["places"]), pick(c["foods"])
    day, weather, tool, person = pick(c["days"]), pick(c["weather"]), pick(c["tools"]), pick(c["people"])
    n = rng.randrange(len(c["numbers"]))
    num, foods, animals = c["numbers"][n], _plural(food), _plural(animal)
    other_place = pick([p for p in c["places"] if p != place])

    def emo() -> str:
        return pick(c["emotions"])

    def act() -> str:
        return pick(c["actions"])

    openings = [
        f"Once there was a {'girl' if female else 'boy'} named {hero}.",
        f"On {day}, {hero} went to the {place}.",
        f"{hero} lived near the {place} with {her} {person}.",
        f"It was {weather} on {day}, and {hero} was {emo()}.",
    ]
    body = [
        f"{She} saw {_a(colour)} {animal} near the {place}.",
        f"The {colour} {animal} {act()} to the {other_place}.",
        f"{hero} had {num} {foods} in {her} bag.",
        f"{hero} gave {num} {foods} to the {colour} {animal}.",
        f"{hero} felt {emo()} because the {animal} {act()} away.",
        f"{hero} and {friend} {act()} to the {place} together.",
        f"{She} used {_a(tool)} to help the {animal}.",
        f"Then {she} counted {num} {animals} at the {place}.",
        f"{her.capitalize()} {person} said, \"Let us take the {tool} to the {place}.\"",
        f"The weather was {weather}, so {hero} stayed at the {place}.",
        f"{hero} told {friend} about the {colour} {animal}.",
        f"{friend} was {emo()} to see the {animal}.",
        f"The {animal} ate {num} {foods} and {act()} to the {place}.",
        f"{She} liked the {colour} {food} best.",
        f"{hero} found {_a(food)} under a tree near the {place}.",
        f"The {animal} wanted the {food}, so {hero} shared it.",
        f"{hero} {act()} home with {her} {person}.",
    ]
    if n >= 1:  # counting down from two would leave "one", which is not a number word here
        body.append(f"{hero} had {num} {foods}, ate one, and had {c['numbers'][n - 1]} left.")
    endings = [
        f"At the end of the day, {hero} felt {emo()}.",
        f"{hero} went to sleep and dreamed of the {colour} {animal}.",
        f"On {day} night, {hero} and {friend} were {emo()}.",
        f"{hero} said goodbye to the {animal} and went home.",
    ]
    n_body = rng.randint(2, 6)  # plus opening and ending: 4-8 sentences
    sentences = [pick(openings), *rng.sample(body, n_body), pick(endings)]
    return " ".join(sentences)


def _stream(n: int, seed: int, stream: str) -> list[str]:
    assert stream in _STREAMS
    rng = random.Random(f"tinylm/{stream}/{seed}")
    return [_story(rng) for _ in range(n)]


def generate_stories(n: int, seed: int) -> list[str]:
    """Training stories: the first `n` of the training stream for `seed`."""
    return _stream(n, seed, "train")


def validation_stories(n: int, seed: int) -> list[str]:
    """Held-out stories the LM is evaluated on (never trained on)."""
    return _stream(n, seed, "val")


def harvest_texts(n: int, seed: int) -> list[str]:
    """Texts for harvesting SAE training activations.

    Drawn from the "harvest" stream, independent of both the training stream the
    LM learned from and the validation stream, so SAEs never see LM training text.
    """
    return _stream(n, seed, "harvest")
