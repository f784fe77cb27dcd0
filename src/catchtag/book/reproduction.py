"""The reproduction table: every claim of the paper, its value, ours, and a verdict.

Every chapter writes its numbers once, through `catchtag.book.report.Results`, to
`_build/results/<chapter>.json` (which model sits in slot m1 and m2, the parameters, the
chapter-level numbers) and `<chapter>-<model>.json` (that model's numbers). This module reads those
files back (`report.read_results`) and nothing else: a chapter that is not built yet, or a number
that is missing, makes its row "pending" instead of breaking the build.

Names are the chapter's quantities without the chapter prefix: `m1_first_share` is the first
model's `first_share` (glued in the chapter as `sinks_m1_first_share`), `seconds` the run time.

Verdict rules are data (`Rule`): the paper states ranges and statements, not pass/fail criteria, so
each rule is our reading of the claim, shown on the page beside its row. A rule of kind "verdict"
reads a verdict that the chapter computed with a tested library function and put as a quantity.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .report import read_results

REPRODUCED, PARTLY, NOT_REPRODUCED, OFFLINE, PENDING = (
    "reproduced", "partly", "not reproduced", "not testable offline", "pending")
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, OFFLINE, PENDING)
BADGE = {REPRODUCED: "✓ **reproduced**", PARTLY: "◐ **partly**", NOT_REPRODUCED: "✗ **not reproduced**",
         OFFLINE: "○ not testable offline", PENDING: "… pending"}


class Values(dict):
    """One chapter's numbers by name (see the module docstring); `params`: its parameters."""

    def __init__(self, *args, params: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.params = dict(params or {})

    def num(self, name: str) -> float | None:
        x = self.get(name)
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return None
        return None if math.isnan(x) else float(x)


# --------------------------------------------------------------------------------------------
# Verdict rules (data)


@dataclass(frozen=True)
class Rule:
    """How a row's verdict is decided from the chapter's numbers.

    kind:
    - "at_least": reproduced when every model's value (names: one per model slot, absent models
      skipped) is >= lo; partly when some are; not reproduced when none is.
    - "within": the same with lo <= value <= hi.
    - "verdict": the chapter's own verdict, names[0] holds one of `VERDICTS` (computed by a tested
      library function, never typed in a chapter).
    - "qualitative": always pending (a figure, no number).
    """

    kind: str
    names: tuple[str, ...] = ()
    lo: float = -math.inf
    hi: float = math.inf

    def decide(self, v: Values) -> str:
        if self.kind == "qualitative":
            return PENDING
        if self.kind == "verdict":
            x = v.get(self.names[0])
            return x if x in VERDICTS else PENDING
        xs = [v.num(n) for n in self.names]
        xs = [x for x in xs if x is not None]
        if not xs:
            return PENDING
        inside = [self.lo <= x <= self.hi for x in xs]
        return REPRODUCED if all(inside) else PARTLY if any(inside) else NOT_REPRODUCED

    def text(self) -> str:
        if self.kind == "at_least":
            return f"reproduced when {_names(self.names)} ≥ {self.lo:g} for every model; partly when for some"
        if self.kind == "within":
            return (f"reproduced when {_names(self.names)} is within {self.lo:g}–{self.hi:g} for every "
                    "model; partly when for some")
        if self.kind == "verdict":
            return f"the chapter's verdict `{self.names[0]}` (its rule is stated in the chapter)"
        return "qualitative (a figure): no verdict"


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


# --------------------------------------------------------------------------------------------
# The claims


@dataclass
class Claim:
    key: str              # our id
    section: str          # where the paper says it
    claim: str            # the claim, in a line
    paper: str            # the paper's value
    chapter: str          # book/<chapter>.md computes ours
    heading: str          # the section of that chapter that shows it (its title)
    ours: str             # template over the chapter's names: "{m1_model}: {m1_first_share:.0%}"
    rule: Rule
    protocol: str = ""    # which protocol "ours" follows: "paper", "paper, via note", "ours"

    def names(self) -> list[str]:
        found = re.findall(r"\{(\w+)(?::[^}]*)?\}", self.ours)
        return sorted(set(found) | set(self.rule.names))


CLAIMS: list[Claim] = [
    Claim("first_sink", "§1", "The first token is a sink in most heads (prompt-independent)",
          "yes, in most heads", "sinks", "How many sinks, and where",
          "{m1_model}: {m1_first_share:.0%} of (head, prompt) pairs; {m2_model}: {m2_first_share:.0%}",
          Rule("at_least", ("m1_first_share", "m2_first_share"), 0.5),
          "paper, via note (received attention, ε = 0.2); ours: keys seen by fewer than 10 later queries not scored"),
    Claim("sink_kinds", "§1", "The other (prompt-dependent) sinks are punctuation or boundary tokens",
          "punctuation, boundary tokens", "sinks", "What the other sinks are",
          "{m1_model}: {m1_boundary_share:.0%} of non-first sinks are punctuation or line breaks; "
          "{m2_model}: {m2_boundary_share:.0%}",
          Rule("at_least", ("m1_boundary_share", "m2_boundary_share"), 0.5), "ours (census rule: ≥ 10 later queries)"),
    Claim("teaser", "§1, Fig. 1", "Three emotion sentences, each caught by a different sink",
          "one head shown", "sinks", "The teaser: three sentences, three sinks?",
          "heads that separate the sentences: {m1_model}: {m1_separating} of {m1_n_heads}; "
          "{m2_model}: {m2_separating} of {m2_n_heads}",
          Rule("at_least", ("m1_separating", "m2_separating"), 1), "ours (census rule: ≥ 10 later queries)"),
    Claim("catch_runs", "§1", "Sink heads catch runs of tokens: most tokens attend mostly to a sink",
          "yes", "catch", "How much is caught, and how long are the segments?",
          "{m1_model}: {m1_caught_share:.0%} of (token, head) pairs caught; {m2_model}: {m2_caught_share:.0%}",
          Rule("at_least", ("m1_caught_share", "m2_caught_share"), 0.5), "ours (census rule: ≥ 10 later queries)"),
    Claim("tag_direction", "§1, Fig. 1b", "Caught tokens receive the sink's value vector: they point along its tag",
          "tags are copied to the caught tokens", "tag", "Caught tokens point along their sink's tag",
          "median cos(head output, tag), caught vs not caught: {m1_model}: {m1_cos_caught:.2f} vs "
          "{m1_cos_not:.2f}; {m2_model}: {m2_cos_caught:.2f} vs {m2_cos_not:.2f}",
          Rule("verdict", ("verdict_tag_direction",)), "ours (tag t_s = W_O^h v_s)"),
    Claim("catch_clusters", "§3, Fig. 2", "Token representations cluster by the sink that caught them",
          "clusters by sink (PCA)", "tag", "Tokens cluster by their sink (paper Fig. 2) and move along the tags (Fig. 1b)",
          "one head per model in a figure: {m1_model} {m1_fig_head}; {m2_model} {m2_fig_head}",
          Rule("qualitative"), "ours (PCA of head outputs; the paper's Fig. 2 is of token representations)"),
    Claim("tag_ev", "§3.2, Fig. 3", "1–2 tags explain 20%–40% of a head's output, some up to 70%",
          "20%–40% typical, up to 70%", "tag", "How much of a head's output do the tags explain?",
          "median VE (paper's norm ratio) {m1_model}: {m1_ve_paper_median:.0%} (mean value direction "
          "{m1_ve_mean_value_median:.0%}); {m2_model}: {m2_ve_paper_median:.0%} (mean value direction "
          "{m2_ve_mean_value_median:.0%})",
          Rule("within", ("m1_ve_paper_median", "m2_ve_paper_median"), 0.2, 0.4), "paper, via note"),
    Claim("release", "§1", "Later layers retrieve tokens by their tag (release)",
          "mechanism stated (shown by construction in §7)", "release", "Effects of removing the tag",
          "{m1_model}: {m1_release_summary}; {m2_model}: {m2_release_summary}",
          Rule("verdict", ("verdict_release",)), "ours (prompt-dependent '.' sinks, edits vs random)"),
    Claim("probe_truth", "§4, Table 1", "A probe on the tag alone (θ_tag) tells true from false (cities)",
          "92.5%–99.5% over five models", "probing", "What the paper says / what we see",
          "paper's protocol (final \".\", mass-mean, no bias; 95% Wilson interval): {m1_model}: {m1_cities_tag_ci} (logistic "
          "{m1_cities_tag_logistic:.1%}); {m2_model}: {m2_cities_tag_ci} (logistic {m2_cities_tag_logistic:.1%}); "
          "country-only control {country_only:.1%}. Faithful test (ours, \".\" tags at a later token): "
          "{m1_model} {m1_faithful_applies}, θ_tag {m1_faithful_tag_ci}; {m2_model} {m2_faithful_applies}; "
          "verdict {verdict_faithful}",
          Rule("at_least", ("m1_cities_tag", "m2_cities_tag"), 0.925), "paper, via note (+ ours)"),
    Claim("probe_notag", "§4, Table 1", "With the tag removed (θ_no tag) the probe is near chance",
          "near chance", "probing", "What the paper says / what we see",
          "paper's protocol: {m1_model}: {m1_cities_notag_ci} ({m1_notag_reading}); "
          "{m2_model}: {m2_cities_notag_ci} ({m2_notag_reading})",
          Rule("verdict", ("verdict_notag",)), "paper, via note; reading: ours"),
    Claim("probe_sentiment", "App., Table 7", "θ_tag tells positive from negative sentiment",
          "86.5%–94.0%", "probing", "What the paper says / what we see",
          "paper's protocol: {m1_model}: {m1_sentiment_tag_ci}; {m2_model}: {m2_sentiment_tag_ci}; "
          "bag of words {sentiment_bow:.1%}",
          Rule("at_least", ("m1_sentiment_tag", "m2_sentiment_tag"), 0.865), "paper, via note"),
    Claim("reasoning", "§5, Fig. 5", "Reasoning distillation raises the sinks per head",
          "Qwen2.5-14B 1.125 → 2.196 (R1-Distill-Qwen-14B); Llama-3.1-8B 1.993 → 2.025 (R1-Distill-Llama-8B)",
          "reasoning", "What the paper says / what we see",
          "{summary}",
          Rule("verdict", ("verdict_reasoning",)), "paper, via note (150-token prompts); offline: our proxy"),
    Claim("qknorm_total", "§6", "With QK-norm the total number of sinks remains similar",
          "\"remains similar\"", "qknorm", "What the paper says / what we see",
          "{total_summary}", Rule("verdict", ("verdict_total",)), "ours (census rule: ≥ 10 later queries)"),
    Claim("qknorm_other", "§6", "With QK-norm non-first-token sinks become more common",
          "more common", "qknorm", "What the paper says / what we see",
          "{other_summary}", Rule("verdict", ("verdict_other",)), "ours (census rule: ≥ 10 later queries)"),
    Claim("minimal_construction", "§7, Thm 7.1", "A two-layer transformer solves the task by catch, tag, release",
          "explicit construction (limit s_tag → ∞)", "minimal", "The construction (Theorem 7.1)",
          "{construction_summary}", Rule("verdict", ("verdict_construction",)), "paper (theorem); ours (weights)"),
    Claim("minimal_training", "§7, Fig. 7", "Training finds the mechanism in at most 4 of 10 runs",
          "at most 4 of 10", "minimal", "What each run learned",
          "{n_ctr} of {n_seeds} runs by our criterion ({settings} settings; 95% Wilson interval "
          "{ctr_share_lo:.0%}–{ctr_share_hi:.0%} for the share of runs)",
          Rule("verdict", ("verdict_training",)), "paper, via note (its recipe; reduced by default: see the chapter)"),
    Claim("kv_sinks", "§1, abstract", "Sinks are critical for performance under KV-caching",
          "\"critical\" (via StreamingLLM; no number)", "kvcache", "Does a bounded cache need its sinks?",
          "perplexity ratio window-only / first 4 + window at B = {b_small}: {m1_model}: "
          "{m1_window_streaming_small}; {m2_model}: {m2_window_streaming_small}. Random past tokens / "
          "detected sinks (ours): {m1_random_sinks_small} and {m2_random_sinks_small}",
          Rule("verdict", ("verdict_kv_sinks",)), "StreamingLLM's protocol, original positions (ours)"),
]


# --------------------------------------------------------------------------------------------
# The table


def slug(heading: str) -> str:
    """The anchor myst-parser gives a heading (myst_heading_anchors)."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"\s", "-", s)


def _fill(template: str, v: Values) -> tuple[str, list[str]]:
    """The template with each {name[:spec]} replaced by the chapter's value; names not found are
    listed. None (an absent model, a number the chapter could not compute) shows as n/a."""
    missing = []

    def sub(m):
        name, spec = m.group(1), m.group(2)
        if name not in v:
            missing.append(name)
            return "?"
        x = v[name]
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "n/a"
        if spec and isinstance(x, (int, float)) and not isinstance(x, bool):
            return format(x, spec)
        if isinstance(x, float):
            return f"{x:.3g}"
        return str(x)

    return re.sub(r"\{(\w+)(?::([^}]*))?\}", sub, template), missing


@dataclass
class Row:
    claim: Claim
    ours: str
    verdict: str
    note: str
    built: bool


def chapter_values(chapter: str, results: str | Path | None = None) -> Values | None:
    """One chapter's numbers from its results files (None when it has not written them)."""
    data = read_results(chapter, results)
    if data is None:
        return None
    params = data.pop("params", {})
    return Values(data, params=params)


def evaluate(results: str | Path | None = None, chapters: list[str] | None = None) -> list[Row]:
    """One row per claim, from the results files in `results` (default: the book's results folder).

    `chapters`: the chapters in the book (the toc); a claim whose chapter is not among them, or
    has written no results, is pending.
    """
    cache: dict[str, Values | None] = {}
    rows = []
    for c in CLAIMS:
        if c.chapter not in cache:
            in_book = chapters is None or c.chapter in chapters
            cache[c.chapter] = chapter_values(c.chapter, results) if in_book else None
        v = cache[c.chapter]
        if v is None:
            rows.append(Row(c, "—", PENDING, f"chapter `{c.chapter}` not built yet", False))
            continue
        ours, missing = _fill(c.ours, v)
        missing += [n for n in c.rule.names if n not in v]
        if missing:
            rows.append(Row(c, "—", PENDING, "numbers not found: " + _names(sorted(set(missing))), True))
            continue
        rows.append(Row(c, ours, c.rule.decide(v), c.rule.text(), True))
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row], link_suffix: str = ".ipynb") -> str:
    """The rows as a MyST table; 'where' links to the chapter's section."""
    lines = ["| claim (paper) | paper's value | ours | protocol | verdict | where |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        c = r.claim
        if r.built:
            target = f"{c.chapter}{link_suffix}" + (f"#{slug(c.heading)}" if c.heading else "")
            where = f"[{c.chapter}: {c.heading or 'the chapter'}]({target})"
        else:
            where = f"`book/{c.chapter}.md`"
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"{c.claim} ({c.section})", c.paper, r.ours, c.protocol, BADGE[r.verdict], where)) + " |")
    return "\n".join(lines)


def rules_table(rows: list[Row]) -> str:
    """How each row's verdict was decided (our rule, the chapter's own verdict, or why pending)."""
    lines = ["| claim | how the verdict is decided |", "|---|---|"]
    for r in rows:
        lines.append(f"| {_cell(r.claim.claim)} | {_cell(r.note)} |")
    return "\n".join(lines)


def names_table(results: str | Path | None = None) -> str:
    """The names each chapter must write, and whether its results files have them."""
    lines = ["| chapter | names | state |", "|---|---|---|"]
    for chapter, names in needed_names().items():
        v = chapter_values(chapter, results)
        if v is None:
            state = "not built"
        else:
            gone = [n for n in names if n not in v]
            state = "all found" if not gone else "missing: " + _names(gone)
        lines.append(f"| {chapter} | {_names(names)} | {state} |")
    return "\n".join(lines)


def tally(rows: list[Row]) -> dict[str, int]:
    return {v: sum(r.verdict == v for r in rows) for v in VERDICTS}


def needed_names() -> dict[str, list[str]]:
    """The names this page reads, by chapter."""
    out: dict[str, list[str]] = {}
    for c in CLAIMS:
        out.setdefault(c.chapter, [])
        out[c.chapter] += [n for n in c.names() if n not in out[c.chapter]]
    return out


def page(results: str | Path | None = None) -> tuple[dict[str, str], dict[str, int]]:
    """Everything the reproduction page shows: `(tables, counts)`. `tables` maps the glue names
    `repro_table`, `repro_rules`, `repro_names` to Markdown tables; `counts` maps `n_claims` and
    `n_<verdict>` (spaces as underscores) to numbers of claims. Chapters are those of the book's
    table of contents when this runs in a checkout of the book, else whatever results exist."""
    try:
        from .bookbuild import chapters_in_toc

        in_book = chapters_in_toc()
    except Exception:  # not in a checkout of the book (e.g. on Colab): read whatever is there
        in_book = None
    rows = evaluate(results, in_book)
    tables = {"repro_table": markdown_table(rows), "repro_rules": rules_table(rows),
              "repro_names": names_table(results)}
    counts = {"n_" + verdict.replace(" ", "_"): n for verdict, n in tally(rows).items()}
    counts["n_claims"] = len(rows)
    return tables, counts
