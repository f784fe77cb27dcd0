"""The reproduction table: every claim of the paper, its value, ours, and a verdict.

The chapters glue their numbers (myst-nb `glue`), and papermill keeps every glued value in the
executed notebook (`_build/executed/<chapter>.ipynb`) as an output with `scrapbook` metadata. This
module reads those values back (`read_glue`), so the reproduction page needs nothing from a chapter
but the glue names listed in `CLAIMS`; a chapter that is not built yet, or a glue name that is
missing, makes its row "pending" instead of breaking the build.

A chapter can also decide its own verdict: when it glues `claim_<key>_verdict` (one of `VERDICTS`)
and optionally `claim_<key>` (the text for the "ours" column), those take precedence over the
criterion below. The criteria are ours (the paper states ranges, not pass/fail rules); each row
says which one it applies.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPRODUCED, PARTLY, NOT_REPRODUCED, OFFLINE, PENDING = (
    "reproduced", "partly", "not reproduced", "not testable offline", "pending")
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, OFFLINE, PENDING)
BADGE = {REPRODUCED: "✓ **reproduced**", PARTLY: "◐ **partly**", NOT_REPRODUCED: "✗ **not reproduced**",
         OFFLINE: "○ not testable offline", PENDING: "… pending"}


# --------------------------------------------------------------------------------------------
# Reading glued values


def read_glue(ipynb: str | Path) -> dict[str, str]:
    """Every value glued in an executed notebook, as the text the book would show.

    Markdown glue (`report.glue_text`) gives its markdown; other values their plain-text repr
    (a Python string repr is unquoted).
    """
    nb = json.loads(Path(ipynb).read_text())
    out: dict[str, str] = {}
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []):
            meta = (o.get("metadata") or {}).get("scrapbook")
            if not meta or "name" not in meta:
                continue
            prefix = meta.get("mime_prefix", "")
            data = {k.removeprefix(prefix): v for k, v in (o.get("data") or {}).items()}
            text = data.get("text/markdown")
            if text is None:
                text = data.get("text/plain")
                if isinstance(text, list):
                    text = "".join(text)
                wrapped = re.fullmatch(r"np\.\w+\((.*)\)", text.strip()) if text else None
                if wrapped:  # numpy 2 scalar repr, e.g. np.float64(0.44)
                    text = wrapped.group(1)
                if text is not None and text[:1] in "'\"":
                    try:
                        text = str(ast.literal_eval(text))
                    except (ValueError, SyntaxError):
                        pass
            if isinstance(text, list):
                text = "".join(text)
            if text is not None:
                out[meta["name"]] = str(text).strip()
    return out


def parameters(ipynb: str | Path) -> dict:
    """The parameters papermill ran a notebook with (empty: the defaults)."""
    nb = json.loads(Path(ipynb).read_text())
    return dict(nb.get("metadata", {}).get("papermill", {}).get("parameters") or {})


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*%?")


def number(text) -> float | None:
    """The first number in a glued text; '54%' is 0.54; 'n/a', 'nan' and no number are None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return None if isinstance(text, float) and math.isnan(text) else float(text)
    m = _NUMBER.search(str(text).replace(",", "").replace("\u2212", "-"))
    if not m:
        return None
    s = m.group(0).strip()
    value = float(s.rstrip("%").strip())
    return value / 100 if s.endswith("%") else value


def count_of(text) -> tuple[int, int] | None:
    """'2 of 2' -> (2, 2)."""
    m = re.search(r"(\d+)\s+of\s+(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


class Values(dict):
    """Glued texts of one chapter, with numeric access; `params`: the chapter's papermill parameters."""

    def __init__(self, *args, params: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.params = dict(params or {})

    def num(self, name: str) -> float | None:
        return number(self.get(name))


# --------------------------------------------------------------------------------------------
# The claims


def _share_verdict(names: list[str], lo: float, hi: float = math.inf) -> Callable[[Values], str]:
    """Reproduced when every model's value is in [lo, hi], partly when some are."""

    def verdict(v: Values) -> str:
        xs = [v.num(n) for n in names]
        xs = [x for x in xs if x is not None]
        if not xs:
            return PENDING
        inside = [lo <= x <= hi for x in xs]
        return REPRODUCED if all(inside) else PARTLY if any(inside) else NOT_REPRODUCED

    return verdict


def _verdict_teaser(v: Values) -> str:
    xs = [v.num(n) for n in ("m1_separating", "m2_separating")]
    xs = [x for x in xs if x is not None]
    if not xs:
        return PENDING
    return REPRODUCED if all(x >= 1 for x in xs) else PARTLY if any(x >= 1 for x in xs) else NOT_REPRODUCED


def _verdict_kinds(v: Values) -> str:
    xs = [(v.num(f"m{i}_punct_share"), v.num(f"m{i}_newline_share")) for i in (1, 2)]
    xs = [a + b for a, b in xs if a is not None and b is not None]
    if not xs:
        return PENDING
    return REPRODUCED if all(x >= 0.5 for x in xs) else PARTLY if any(x >= 0.25 for x in xs) else NOT_REPRODUCED


def _verdict_probe(task: str, lo: float) -> Callable[[Values], str]:
    def verdict(v: Values) -> str:
        xs = [v.num(f"{task}_tag_{i}") for i in (0, 1)]
        xs = [x for x in xs if x is not None]
        if not xs:
            return PENDING
        if all(x >= lo for x in xs):
            return REPRODUCED
        beats = count_of(v.get(f"{task}_beats_random"))
        if any(x >= lo for x in xs) or (beats and beats[0] > 0):
            return PARTLY
        return NOT_REPRODUCED

    return verdict


def _verdict_notag(v: Values) -> str:
    c = count_of(v.get("cities_notag_near_chance"))
    if not c or c[1] == 0:
        return PENDING
    return REPRODUCED if c[0] == c[1] else PARTLY if c[0] else NOT_REPRODUCED


def _verdict_reasoning(v: Values) -> str:
    if not (v.params.get("base_model") and v.params.get("reasoning_model")):
        return OFFLINE  # the paper's pair needs the hub or NDIF; the offline run is our own proxy
    ratio = v.num("sph_ratio")
    if ratio is None:
        return PENDING
    more_ev = (v.num("hev_tuned") or 0) > (v.num("hev_base") or 0)
    return REPRODUCED if ratio >= 1.25 and more_ev else PARTLY if ratio >= 1.25 or more_ev else NOT_REPRODUCED


def _verdict_qk_total(v: Values) -> str:
    t = v.get("verdict_total")
    if t is None:
        return PENDING
    return REPRODUCED if t == "similar" else OFFLINE if t.startswith("not compared") else NOT_REPRODUCED


def _verdict_qk_other(v: Values) -> str:
    t = v.get("verdict_other")
    if t is None:
        return PENDING
    return REPRODUCED if t == "more common" else OFFLINE if t.startswith("not compared") else NOT_REPRODUCED


def _verdict_construction(v: Values) -> str:
    t = v.get("cons_holds")
    return PENDING if t is None else REPRODUCED if t == "holds" else NOT_REPRODUCED


def _verdict_training(v: Values) -> str:
    n = v.num("n_ctr")
    if n is None:
        return PENDING
    return NOT_REPRODUCED if n == 0 else REPRODUCED if n <= 4 else PARTLY


def _verdict_caught(v: Values) -> str:
    xs = [v.num(f"catch_{m}_caught") for m in ("a", "b")]
    xs = [x for x in xs if x is not None]
    if not xs:
        return PENDING
    return REPRODUCED if all(x >= 0.5 for x in xs) else PARTLY if any(x >= 0.5 for x in xs) else NOT_REPRODUCED


def _verdict_tag_direction(v: Values) -> str:
    pairs = [(v.num(f"tag_{m}_cos_caught"), v.num(f"tag_{m}_cos_not")) for m in ("a", "b")]
    pairs = [(c, n) for c, n in pairs if c is not None and n is not None]
    if not pairs:
        return PENDING
    if all(c >= 0.5 and c > n for c, n in pairs):
        return REPRODUCED
    return PARTLY if any(c > n for c, n in pairs) else NOT_REPRODUCED


def _verdict_tag_ev(v: Values) -> str:
    meds = [v.num(f"tag_{m}_ev_median") for m in ("a", "b")]
    meds = [x for x in meds if x is not None]
    if not meds:
        return PENDING
    if all(0.2 <= x <= 0.4 for x in meds):
        return REPRODUCED
    share = [v.num(f"tag_{m}_ev_from_20_to_40") or 0 for m in ("a", "b")]
    return PARTLY if any(0.2 <= x <= 0.4 for x in meds) or any(x >= 0.25 for x in share) else NOT_REPRODUCED


def _verdict_release(v: Values) -> str:
    sig = [v.get(f"rel_{m}_dmass_abs_tag_minus_random_sig") for m in ("a", "b")]
    sig = [s == "True" for s in sig if s is not None]
    if not sig:
        return PENDING
    return REPRODUCED if all(sig) else PARTLY if any(sig) else NOT_REPRODUCED


def _pending(v: Values) -> str:
    return PENDING


@dataclass
class Claim:
    key: str              # our id; a chapter may glue claim_<key>_verdict and claim_<key>
    section: str          # where the paper says it
    claim: str            # the claim, in a line
    paper: str            # the paper's value
    chapter: str          # book/<chapter>.md computes ours
    heading: str          # the section of that chapter that shows it (its title)
    ours: str             # markdown template over the chapter's glue names: "{m1_first_share}"
    criterion: str        # our rule for the verdict
    verdict: Callable[[Values], str] = _pending
    needs: list[str] = field(default_factory=list)  # glue names beyond those in `ours`

    def names(self) -> list[str]:
        return sorted(set(re.findall(r"\{(\w+)(?::[^}]*)?\}", self.ours)) | set(self.needs))


CLAIMS: list[Claim] = [
    Claim("first_sink", "§1", "The first token is a sink in most heads (prompt-independent)",
          "yes, in most heads", "sinks", "How many sinks, and where",
          "{m1}: {m1_first_share} of (head, prompt) pairs; {m2}: {m2_first_share}",
          "reproduced when ≥ 50% for every model",
          _share_verdict(["m1_first_share", "m2_first_share"], 0.5)),
    Claim("sink_kinds", "§1", "The other (prompt-dependent) sinks are punctuation or boundary tokens",
          "punctuation, boundary tokens", "sinks", "What the other sinks are",
          "{m1}: {m1_punct_share} punctuation, {m1_newline_share} line breaks; "
          "{m2}: {m2_punct_share}, {m2_newline_share}",
          "reproduced when punctuation + line breaks ≥ 50% of non-first sinks for every model; "
          "partly when ≥ 25% for one",
          _verdict_kinds),
    Claim("teaser", "§1, Fig. 1", "Three emotion sentences, each caught by a different sink",
          "one head shown", "sinks", "The teaser: three sentences, three sinks?",
          "heads that separate the sentences: {m1}: {m1_separating} of {m1_n_heads}; {m2}: {m2_separating} of {m2_n_heads}",
          "reproduced when every model has at least one such head",
          _verdict_teaser),
    Claim("catch_runs", "§1", "Sink heads catch runs of tokens: most tokens attend mostly to a sink",
          "yes", "catch", "How much is caught, and how long are the segments?",
          "{model_a}: {catch_a_caught:.0%} of (token, head) pairs caught; {model_b}: {catch_b_caught:.0%}",
          "reproduced when at least half of the (token, head) pairs are caught, for every model",
          _verdict_caught),
    Claim("tag_direction", "§1, Fig. 1b", "Caught tokens receive the sink's value vector: they point along its tag",
          "tags are copied to the caught tokens", "tag", "Caught tokens point along their sink's tag",
          "median cos(head output, tag), caught vs not caught: {model_a}: {tag_a_cos_caught:.2f} vs "
          "{tag_a_cos_not:.2f}; {model_b}: {tag_b_cos_caught:.2f} vs {tag_b_cos_not:.2f}",
          "reproduced when the caught tokens' median cosine is ≥ 0.5 and above the others', for every model",
          _verdict_tag_direction),
    Claim("catch_clusters", "§3, Fig. 2", "Token representations cluster by the sink that caught them",
          "clusters by sink (PCA)", "tag", "Tokens cluster by their sink (paper Fig. 2) and move along the tags (Fig. 1b)",
          "shown in a figure for {model_a} ({tag_a_fig_head}) and {model_b} ({tag_b_fig_head})",
          "qualitative in the chapter: a verdict needs a number (the chapter may glue claim_catch_clusters_verdict)",
          lambda v: PENDING),
    Claim("tag_ev", "§3.2, Fig. 3", "1–2 tags explain 20%–40% of a head's output variance, some up to 70%",
          "20%–40% typical, up to 70%", "tag", "How much of a head's output do the tags explain?",
          "median EV {model_a}: {tag_a_ev_median:.0%} ({tag_a_n_tags:.1f} tags per head, {tag_a_ev_above_70:.0%} "
          "of heads above 70%); {model_b}: {tag_b_ev_median:.0%} ({tag_b_n_tags:.1f}, {tag_b_ev_above_70:.0%})",
          "reproduced when the median EV is within 20%–40% for every model; partly when for one, or when a "
          "quarter of a model's heads are in 20%–40%",
          _verdict_tag_ev, needs=["tag_a_ev_from_20_to_40", "tag_b_ev_from_20_to_40"]),
    Claim("release", "§1", "Later layers retrieve tokens by their tag (release)",
          "mechanism stated (shown by construction in §7)", "release", "Effects of removing the tag",
          "removing the tag vs a random direction, change in later heads' attention to the caught tokens: "
          "{model_a}: {rel_a_dmass_abs_tag_minus_random}; {model_b}: {rel_b_dmass_abs_tag_minus_random}",
          "reproduced when removing the tag moves later attention more than a random direction of the same "
          "norm (95% interval above zero), for every model",
          _verdict_release, needs=["rel_a_dmass_abs_tag_minus_random_sig", "rel_b_dmass_abs_tag_minus_random_sig"]),
    Claim("probe_truth", "§4, Table 1", "A probe on the tag alone (θ_tag) tells true from false (cities)",
          "92.5%–99.5% over five models", "probing", "What the paper says / what we see",
          "{model_0}: {cities_tag_0}; {model_1}: {cities_tag_1}",
          "reproduced when θ_tag ≥ 92.5% for every model; partly when one model is, or θ_tag beats a "
          "random subspace of the same rank",
          _verdict_probe("cities", 0.925), needs=["cities_beats_random"]),
    Claim("probe_notag", "§4, Table 1", "With the tag removed (θ_no tag) the probe is near chance",
          "near chance", "probing", "What the paper says / what we see",
          "{model_0}: {cities_notag_0}; {model_1}: {cities_notag_1} (near chance: {cities_notag_near_chance} models)",
          "reproduced when near chance (within 5 points) for every model",
          _verdict_notag),
    Claim("probe_sentiment", "App., Table 7", "θ_tag tells positive from negative sentiment",
          "86.5%–94.0%", "probing", "What the paper says / what we see",
          "{model_0}: {sentiment_tag_0}; {model_1}: {sentiment_tag_1}",
          "reproduced when θ_tag ≥ 86.5% for every model; partly when one is, or θ_tag beats a random subspace",
          _verdict_probe("sentiment", 0.865), needs=["sentiment_beats_random"]),
    Claim("reasoning", "§5, Fig. 5", "Reasoning distillation raises the sinks per head (1.125 → 2.196)",
          "1.125 → 2.196 (R1-Distill-Qwen-1.5B vs Qwen2.5-Math-1.5B)", "reasoning",
          "What the paper says / what we see",
          "our offline proxy (a small fine-tune): {sph_base:.3f} → {sph_tuned:.3f} (ratio {sph_ratio:.2f}; control {sph_control:.3f})",
          "the paper's pair needs the hub or NDIF; with it (base_model, reasoning_model set) reproduced "
          "when the ratio ≥ 1.25 and more heads have a high EV",
          _verdict_reasoning, needs=["hev_base", "hev_tuned"]),
    Claim("qknorm_total", "§6", "With QK-norm the total number of sinks remains similar",
          "\"remains similar\"", "qknorm", "What the paper says / what we see",
          "{verdict_total}: {a_sph:.2f} ({a_name}) vs {b_sph:.2f} ({b_name}) sinks per head",
          "reproduced when the ratio is within 0.8–1.25 (the chapter's rule); our pair differs in more "
          "than QK-norm",
          _verdict_qk_total),
    Claim("qknorm_other", "§6", "With QK-norm non-first-token sinks become more common",
          "more common", "qknorm", "What the paper says / what we see",
          "{verdict_other}: {a_other_share:.0f}% ({a_name}) vs {b_other_share:.0f}% ({b_name}) of sinks",
          "reproduced when the QK-norm model has the larger share",
          _verdict_qk_other),
    Claim("minimal_construction", "§7, Thm 7.1", "A two-layer transformer solves the task by catch, tag, release",
          "explicit construction", "minimal", "The construction (Theorem 7.1)",
          "our hand-set model: worst error {cons_worst8} under the bound {cons_bound8}; the bound {cons_holds}",
          "reproduced when our construction's error is under its bound at every length",
          _verdict_construction),
    Claim("minimal_training", "§7, Fig. 7", "Training finds the mechanism in at most 4 of 10 runs",
          "at most 4 of 10", "minimal", "What each run learned",
          "{n_ctr} of {n_seeds} runs by our criterion",
          "reproduced when 1–4 runs of 10 find it; partly when more do",
          _verdict_training),
]


# --------------------------------------------------------------------------------------------
# The table


def slug(heading: str) -> str:
    """The anchor myst-parser gives a heading (myst_heading_anchors)."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"\s", "-", s)


def _fill(template: str, v: Values) -> tuple[str, list[str]]:
    missing = []

    def sub(m):
        name, spec = m.group(1), m.group(2)
        if name not in v:
            missing.append(name)
            return "?"
        text = v[name]
        x = number(text)
        raw = re.fullmatch(r"[-+]?\d+(\.\d*)?(e[-+]?\d+)?", text)
        if spec and x is not None and raw:
            return format(float(text), spec)
        if x is not None and re.fullmatch(r"[-+]?\d+\.\d{4,}(e[-+]?\d+)?", text):  # a raw float
            text = f"{x:.3g}" if abs(x) < 1e-3 else f"{x:.2f}"
        return text

    return re.sub(r"\{(\w+)(?::([^}]*))?\}", sub, template), missing


@dataclass
class Row:
    claim: Claim
    ours: str
    verdict: str
    note: str
    built: bool


def evaluate(executed: str | Path, chapters: list[str] | None = None) -> list[Row]:
    """One row per claim, from the executed notebooks in `executed`.

    `chapters`: the chapters in the book (the toc); a claim whose chapter is not among them, or
    not executed, is pending.
    """
    executed = Path(executed)
    cache: dict[str, Values | None] = {}
    rows = []
    for c in CLAIMS:
        if c.chapter not in cache:
            path = executed / f"{c.chapter}.ipynb"
            if path.exists() and (chapters is None or c.chapter in chapters):
                v = Values(read_glue(path), params=parameters(path))
                cache[c.chapter] = v
            else:
                cache[c.chapter] = None
        v = cache[c.chapter]
        if v is None:
            rows.append(Row(c, "—", PENDING, f"chapter `{c.chapter}` not built yet", False))
            continue
        own_verdict = v.get(f"claim_{c.key}_verdict")
        template = f"{{claim_{c.key}}}" if f"claim_{c.key}" in v else c.ours
        ours, missing = _fill(template, v)
        missing += [n for n in c.needs if n not in v and own_verdict is None]
        if own_verdict in VERDICTS:
            verdict, note = own_verdict, "verdict glued by the chapter"
        elif missing:
            verdict, note, ours = PENDING, "glue names not found: " + ", ".join(f"`{n}`" for n in missing), "—"
        else:
            verdict, note = c.verdict(v), c.criterion
        rows.append(Row(c, ours, verdict, note, True))
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row], link_suffix: str = ".ipynb") -> str:
    """The rows as a MyST table; 'where' links to the chapter's section."""
    lines = ["| claim (paper) | paper's value | ours | verdict | where |", "|---|---|---|---|---|"]
    for r in rows:
        c = r.claim
        if r.built:
            target = f"{c.chapter}{link_suffix}" + (f"#{slug(c.heading)}" if c.heading else "")
            where = f"[{c.chapter}: {c.heading or 'the chapter'}]({target})"
        else:
            where = f"`book/{c.chapter}.md`"
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"{c.claim} ({c.section})", c.paper, r.ours, BADGE[r.verdict], where)) + " |")
    return "\n".join(lines)


def rules_table(rows: list[Row]) -> str:
    """How each row's verdict was decided (our rule, the chapter's own verdict, or why pending)."""
    lines = ["| claim | how the verdict is decided |", "|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r.claim.claim)} | {_cell(r.note)} |")
    return "\n".join(lines)


def names_table(executed: str | Path) -> str:
    """The glue names each chapter must provide, and whether its executed notebook has them."""
    lines = ["| chapter | glue names | state |", "|---|---|---|"]
    for chapter, names in glue_names().items():
        path = Path(executed) / f"{chapter}.ipynb"
        if not path.exists():
            state = "not built"
        else:
            have = read_glue(path)
            gone = [n for n in names if n not in have and not n.startswith("claim_")]
            state = "all found" if not gone else "missing: " + ", ".join(f"`{n}`" for n in gone)
        lines.append(f"| {chapter} | {', '.join(f'`{n}`' for n in names)} | {state} |")
    return "\n".join(lines)


def tally(rows: list[Row]) -> dict[str, int]:
    return {v: sum(r.verdict == v for r in rows) for v in VERDICTS}


def glue_names() -> dict[str, list[str]]:
    """The glue names this page reads, by chapter (plus the optional claim_<key>[_verdict])."""
    out: dict[str, list[str]] = {}
    for c in CLAIMS:
        out.setdefault(c.chapter, [])
        out[c.chapter] += [n for n in c.names() if n not in out[c.chapter]]
    return out


def glued_in_source(md_text: str) -> list[re.Pattern]:
    """Patterns for the names a chapter's source glues (f-strings become wildcards)."""
    pats = []
    for m in re.finditer(r"glue(?:_text)?\(\s*(f?)([\"'])(.+?)\2", md_text):
        name = m.group(3)
        if m.group(1):
            parts = re.split(r"\{[^}]*\}", name)
            pats.append(re.compile(".+?".join(re.escape(p) for p in parts)))
        else:
            pats.append(re.compile(re.escape(name)))
    return pats
