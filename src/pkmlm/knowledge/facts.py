"""A synthetic biography corpus for measuring knowledge capacity in bits.

After Allen-Zhu & Li, "Physics of Language Models, Part 3.1/3.3" (bioS data): N people, each with
six attributes drawn independently and uniformly from fixed value sets, stated in biographies that
use several sentence phrasings in shuffled orders (the "multi" + "permute" + "fullname"
augmentations that Part 3.1 finds necessary for the knowledge to be extractable). Because every
value is uniform and independent, a person's facts carry exactly `sum(log2 n_values)` bits, and a
model that assigns the true answer probability p stores at least `log2(n_values) + log2(p)` bits
of it (`pkmlm.metrics.recall`).

Everything is built here from a seeded RNG, with no copied name lists: person, city, university
and employer names are strings of syllables (so a name is several BPE pieces, not one token);
fields of study are a short hand-written list of ordinary subject words. Each attribute's value
set is prefix-free (no value is a prefix of another), so a greedy answer that reproduces the
answer's tokens is the answer and not the start of a longer one.

Outputs (`write_corpus`): `bios.jsonl` (`{"text", "person", "template"}`, shuffled), `qa.jsonl`
(`{"prompt", "answer", "person", "attribute", "n_values"}`, the answer continuing the prompt after
one space) and `meta.json` (cardinalities, bits per person, total bits).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ATTRIBUTES",
    "Attribute",
    "Person",
    "biography",
    "corpus_meta",
    "make_people",
    "questions",
    "write_corpus",
]

# --- names from syllables -------------------------------------------------------------------------

# Consonant-vowel(-consonant) syllables: 24 onsets x 9 nuclei x 8 codas = 1,728 syllables, enough
# that two-to-three-syllable names are unique by the million and that no syllable pool is a list
# of real names.
_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sh",
)
_NUCLEI = ("a", "e", "i", "o", "u", "ae", "io", "ou", "ea")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "k")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(lo, hi))).capitalize()


def _prefix_free_unique(make: Callable[[], str], n: int) -> list[str]:
    """`n` distinct strings from `make`, none a prefix of another (sorted)."""
    values: set[str] = set()
    while len(values) < n:
        candidate = make()
        if candidate in values or any(v.startswith(candidate) or candidate.startswith(v) for v in values):
            continue
        values.add(candidate)
    return sorted(values)


# Fields of study: ordinary subject words written for this file (48 -> 5.58 bits). Prefix-free.
_FIELDS = (
    "astronomy",
    "biology",
    "chemistry",
    "physics",
    "geology",
    "botany",
    "zoology",
    "ecology",
    "mathematics",
    "statistics",
    "economics",
    "sociology",
    "psychology",
    "linguistics",
    "philosophy",
    "history",
    "archaeology",
    "anthropology",
    "law",
    "medicine",
    "pharmacy",
    "nursing",
    "dentistry",
    "architecture",
    "music",
    "painting",
    "sculpture",
    "theatre",
    "film studies",
    "journalism",
    "civil engineering",
    "mechanical engineering",
    "electrical engineering",
    "computer science",
    "materials science",
    "oceanography",
    "meteorology",
    "agriculture",
    "forestry",
    "nutrition",
    "education",
    "political science",
    "accounting",
    "finance",
    "marketing",
    "veterinary science",
    "classics",
    "theology",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_EMPLOYER_KINDS = (
    "Systems",
    "Industries",
    "Labs",
    "Group",
    "Works",
    "Partners",
    "Motors",
    "Foods",
    "Media",
    "Bank",
    "Logistics",
    "Energy",
)
_UNIVERSITY_KINDS = ("University", "Institute of Technology", "College", "Polytechnic")

# Value-set sizes: each attribute carries several bits (log2 in brackets). Birth dates: 12 months x
# 28 days (every month has them) x 100 years, as Part 3.1's bioS (which uses 200 years).
N_CITIES = 200  # birth city and employer city (7.64 bits each)
N_UNIVERSITIES = 128  # (7.00)
N_EMPLOYERS = 256  # (8.00)
YEARS = range(1900, 2000)  # birth dates: 33,600 values (15.04 bits)


@dataclass(frozen=True)
class Attribute:
    """One attribute: its value set, the sentence phrasings that state it (the first is also the
    question's), each `{name} ... {value}` with the value ending the phrasing."""

    name: str
    values: Sequence[str]
    phrasings: Sequence[str]

    @property
    def n_values(self) -> int:
        return len(self.values)


def _attributes(rng: random.Random) -> list[Attribute]:
    cities = _prefix_free_unique(lambda: _word(rng, 2, 3), N_CITIES)
    universities = _prefix_free_unique(lambda: f"{_word(rng, 2, 2)} {rng.choice(_UNIVERSITY_KINDS)}", N_UNIVERSITIES)
    employers = _prefix_free_unique(lambda: f"{_word(rng, 2, 3)} {rng.choice(_EMPLOYER_KINDS)}", N_EMPLOYERS)
    dates = [f"{m} {d}, {y}" for y in YEARS for m in _MONTHS for d in range(1, 29)]
    return [
        Attribute(
            "birth_date",
            dates,
            (
                "{name} was born on {value}",
                "{name} celebrates a birthday on {value}",
                "The birth date of {name} is {value}",
            ),
        ),
        Attribute(
            "birth_city",
            cities,
            ("{name} was born in {value}", "{name} spent childhood in {value}", "The birthplace of {name} is {value}"),
        ),
        Attribute(
            "university",
            universities,
            ("{name} studied at {value}", "{name} graduated from {value}", "The alma mater of {name} is {value}"),
        ),
        Attribute(
            "field",
            list(_FIELDS),
            (
                "{name} majored in {value}",
                "{name} earned a degree in {value}",
                "The field of study of {name} is {value}",
            ),
        ),
        Attribute(
            "employer",
            employers,
            ("{name} works for {value}", "{name} is employed by {value}", "The employer of {name} is {value}"),
        ),
        # Drawn independently of the employer (an office of it), so it carries its own bits.
        Attribute(
            "employer_city",
            cities,
            ("{name} works in {value}", "{name} has an office in {value}", "The workplace of {name} is in {value}"),
        ),
    ]


ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "employer_city")


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]  # attribute -> value


def make_people(n: int, seed: int) -> tuple[list[Person], list[Attribute]]:
    """`n` people with unique names and independent uniform attributes, and the attribute sets;
    a pure function of (n, seed) (the value sets depend on the seed only, not on n)."""
    attributes = _attributes(random.Random(f"pkmlm-facts/values/{seed}"))
    rng = random.Random(f"pkmlm-facts/people/{seed}")
    names: set[str] = set()
    people = []
    while len(people) < n:
        name = f"{_word(rng, 2, 2)} {_word(rng, 2, 3)}"  # first and last name: four to ten BPE pieces
        if name in names:
            continue
        names.add(name)
        people.append(Person(name, {a.name: rng.choice(a.values) for a in attributes}))
    return people, attributes


def biography(person: Person, attributes: Sequence[Attribute], rng: random.Random) -> str:
    """One biography: every attribute once, each in a random phrasing, in a random order, with the
    full name in every sentence."""
    order = list(attributes)
    rng.shuffle(order)
    return " ".join(rng.choice(a.phrasings).format(name=person.name, value=person.facts[a.name]) + "." for a in order)


def questions(person: Person, attributes: Sequence[Attribute]) -> list[dict]:
    """One recall question per attribute: the first phrasing up to the value (the answer follows
    after one space), as the biographies state it."""
    rows = []
    for a in attributes:
        prompt = a.phrasings[0].split(" {value}")[0].format(name=person.name)
        rows.append(
            {
                "prompt": prompt,
                "answer": person.facts[a.name],
                "person": person.name,
                "attribute": a.name,
                "n_values": a.n_values,
            }
        )
    return rows


def corpus_meta(n_people: int, seed: int, templates: int, attributes: Sequence[Attribute]) -> dict:
    bits = {a.name: math.log2(a.n_values) for a in attributes}
    return {
        "people": n_people,
        "seed": seed,
        "templates": templates,
        "documents": n_people * templates,
        "cardinalities": {a.name: a.n_values for a in attributes},
        "bits_per_attribute": bits,
        "bits_per_person": sum(bits.values()),
        "total_bits": n_people * sum(bits.values()),
        # One exposure = one of the person's biographies read once; an epoch over bios.jsonl is
        # `templates` exposures of every person.
        "exposures_per_epoch": templates,
        "answer_delimiter": " ",
    }


MAX_DOCUMENTS = 10**8  # people x templates: beyond this the shuffle alone needs tens of GB


def estimate_corpus(n_people: int, templates: int, seed: int = 0) -> dict[str, float]:
    """About how large `write_corpus(out, n_people, seed, templates)` is, from 20 people generated
    now: bytes on disk (bios.jsonl + qa.jsonl) and bytes of memory while writing (every biography is
    held for the shuffle: its text plus about 300 bytes of Python objects; each person about 2 kB)."""
    sample = min(n_people, 20)
    people, attributes = make_people(sample, seed)
    rng = random.Random(f"pkmlm-facts/bios/{seed}")
    bio_bytes = (
        sum(
            len(json.dumps({"text": biography(p, attributes, rng), "person": p.name, "template": 0})) + 1
            for p in people
        )
        / sample
    )
    qa_bytes = sum(len(json.dumps(q)) + 1 for p in people for q in questions(p, attributes)) / sample
    documents = float(n_people) * templates
    return {
        "documents": documents,
        "disk": documents * bio_bytes + n_people * qa_bytes,
        "memory": documents * (bio_bytes + 300) + n_people * 2000.0,
    }


def write_corpus(out: str | Path, n_people: int, seed: int, templates: int = 5) -> dict:
    """Write bios.jsonl, qa.jsonl and meta.json into `out` (created); returns the meta."""
    people, attributes = make_people(n_people, seed)
    rng = random.Random(f"pkmlm-facts/bios/{seed}")
    docs = [
        {"text": biography(p, attributes, rng), "person": p.name, "template": t}
        for p in people
        for t in range(templates)
    ]
    rng.shuffle(docs)  # interleave people, so a held-out prefix or a window is not one person
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bios.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(out / "qa.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for p in people for q in questions(p, attributes))
    meta = corpus_meta(n_people, seed, templates, attributes)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
