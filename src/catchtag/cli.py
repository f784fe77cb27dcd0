"""Command line: `python -m catchtag <command> ...` (`--help` on every command).

    python -m catchtag sinks --model smollm2-135m --text "The cat sat. The dog ran." --format table
    python -m catchtag bench --model smollm2-135m --seq-len 2048 --format table

Bad input is answered with one line on stderr and exit status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import CatchtagError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line (exit 2), like every other error here."""

    def error(self, message):
        raise CatchtagError(f"{self.prog}: {message} (see --help)")


def _eps(text: str) -> float:
    from .sinks import check_eps

    try:
        return check_eps(float(text))
    except ValueError:  # a non-number, or a number outside (0, 1)
        raise argparse.ArgumentTypeError(f"{text!r} is not a threshold in (0, 1): use e.g. 0.2") from None


def sinks_json(model, cap, stats, eps: float, min_queries: int | None = None) -> dict:
    """The `sinks` command's result: {model, eps, min_queries, tokens, min_row_sum,
    heads: [{layer, head, min_row_sum, sinks: [{position, token, received, n_queries}]}]}.

    `min_row_sum` is the smallest attention row sum: 1 up to rounding, below 1 for models with
    learned sink logits (gpt-oss), whose rows are reported as the model computes them."""
    mq = stats.min_queries if min_queries is None else min_queries
    sinks = stats.sinks(eps, mq)
    alpha = stats.alpha if stats.alpha is not None else stats.received
    heads = []
    for li, layer in enumerate(stats.layers):
        for h in range(sinks.shape[1]):
            positions = sinks[li, h].nonzero().flatten().tolist()
            heads.append(
                {
                    "layer": layer,
                    "head": h,
                    "min_row_sum": round(float(stats.row_sum[li, h].min()), 6),
                    "sinks": [
                        {"position": k, "token": cap.tokens[k], "received": round(float(alpha[li, h, k]), 6),
                         "n_queries": int(stats.n_queries[li, k])}
                        for k in positions
                    ],
                }
            )
    return {
        "model": model.name, "eps": eps, "min_queries": mq, "tokens": cap.tokens,
        "min_row_sum": round(float(stats.row_sum.min()), 6), "heads": heads,
    }


def _format_table(result: dict) -> str:
    lines = [f"model {result['model']}  eps {result['eps']}  min_queries {result['min_queries']}  "
             f"tokens {len(result['tokens'])}"]
    lines.append(f"{'layer':>5} {'head':>4}  sinks (position 'token' received)")
    for head in result["heads"]:
        if not head["sinks"]:
            continue
        cells = "  ".join(f"{s['position']} {s['token']!r} {s['received']:.3f}" for s in head["sinks"])
        lines.append(f"{head['layer']:>5} {head['head']:>4}  {cells}")
    n = sum(len(h["sinks"]) for h in result["heads"])
    lines.append(f"{n} sinks over {len(result['heads'])} heads ({n / max(len(result['heads']), 1):.3f} per head)")
    if result["min_row_sum"] < 1 - 1e-4:
        lines.append(f"attention rows sum to as little as {result['min_row_sum']:.3f} (learned sink logits: "
                     "the rest goes to the model's sink, not to any token)")
    return "\n".join(lines)


def cmd_sinks(args) -> int:
    from .capture import capture
    from .models import load_model
    from .sinks import sink_stats

    from .textio import read_text

    text = args.text
    if text is None and args.file:
        text = read_text(args.file, "--file")
    if text is None or not text.strip():
        raise CatchtagError("the text is empty: pass --text 'some words' or --file PATH")
    model = load_model(args.model, remote=args.remote, trust_remote_code=args.trust_remote_code)
    layers = None
    if args.layer is not None:
        model.check_layer_head(args.layer)
        layers = [args.layer]
    cap = capture(model, text, layers=layers, resid=False, remote=args.remote, progress=False)[0]
    stats = sink_stats(cap, min_queries=args.min_queries)
    result = sinks_json(model, cap, stats, args.eps)
    out = json.dumps(result, ensure_ascii=False, indent=1) if args.format == "json" else _format_table(result)
    print(out)
    return 0


def whole_number_arg(minimum: int, message: str):
    """An argparse `type` that accepts a whole number >= `minimum` and otherwise raises
    ArgumentTypeError(message.format(text=repr(text))): one checker for every count option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(message.format(text=repr(text)))
        return value

    return parse


_min_queries = whole_number_arg(0, "{text} is not a query count: use a whole number >= 0, e.g. 10")
_seq_len = whole_number_arg(8, "{text} is not a token count: use a whole number >= 8, e.g. 2048")


def cmd_bench(args) -> int:
    from .bench import book_timings, format_book_timings, format_table, run_bench

    if args.book:
        book = book_timings(args.timings)
        if book is None:
            from .book.bookbuild import TIMINGS

            raise CatchtagError(f"no chapter timings at {args.timings or TIMINGS}: execute the book first (make book)")
        print(json.dumps(book, indent=1) if args.format == "json" else format_book_timings(book))
        return 0
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.format == "table" else None
    result = run_bench(args.model, args.seq_len, cold_load=not args.no_cold_load, repeat=args.repeat, progress=say,
                       paired=args.paired)
    print(json.dumps(result, indent=1) if args.format == "json" else format_table(result))
    return 0


def _remote(text: str):
    return {"false": False, "true": True, "local": "local"}.get(text.lower(), text)


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL, REGISTRY
    from .sinks import MIN_QUERIES

    parser = _Parser(prog="python -m catchtag", description="Attention sinks: catch, tag, release (arXiv 2502.00919).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser(
        "sinks",
        help="list the attention sinks of every head for a text",
        description="List the attention sinks of every head: keys whose received attention (mean "
        "attention from the queries that can see them, itself included; in a sliding-window layer "
        "at most the window's queries) exceeds eps. A key seen by fewer than --min-queries later "
        f"queries (default {MIN_QUERIES}) is never a sink. A text that starts with the model's BOS "
        "string keeps that one BOS (none is added). Models without sdpa attention (Gemma-2, "
        "gpt-oss) load with eager attention.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry name ({', '.join(REGISTRY)}) or a Hugging Face id (default {DEFAULT_MODEL})")
    p.add_argument("--text", help="the prompt")
    p.add_argument("--file", help="read the prompt from this file instead of --text")
    p.add_argument("--eps", type=_eps, default=0.2, help="sink threshold in (0, 1) (default 0.2, the paper's)")
    p.add_argument("--layer", type=int, help="only this layer")
    p.add_argument("--min-queries", type=_min_queries, default=MIN_QUERIES,
                   help=f"later queries that must see a key for it to be scored (default {MIN_QUERIES})")
    p.add_argument("--format", choices=("json", "table"), default="json", help="output format (default json)")
    p.add_argument("--remote", type=_remote, default=False, choices=(False, True, "local"),
                   help="false (here), true (NDIF; key from NDIF_API_KEY), local (dry run of the remote path)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run (off by default)")
    p.set_defaults(func=cmd_sinks)
    b = sub.add_parser(
        "bench",
        help="time and memory of the sink census: sdpa forward, naive (full maps), capture path, census in the forward",
        description="Measure, on one input of --seq-len tokens: a plain sdpa forward (with and without "
        "the output layer); the naive census (eager attention with output_attentions=True, then sinks "
        "from the full maps; not run when the maps would pass 6 GiB, their size is reported); "
        "catchtag's capture path (capture of the attention inputs, then sink_stats, which recomputes "
        "the probabilities a block of queries at a time: what runs on NDIF); catchtag's census inside "
        "the forward pass (census_forward: an attention function that accumulates the census while "
        "computing each layer's output; 'streaming' in the JSON keys is the faster of the two catchtag "
        "paths); their seconds (wall clock and CPU) and peak extra memory (RSS, MiB), the largest "
        "difference of received attention between the censuses, a cold (GGUF conversion into a fresh "
        "cache) and a cached model load, and, when the book has been executed, each chapter's last "
        "execution time. Each measurement runs in its own process.",
    )
    b.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name ({', '.join(REGISTRY)}) (default {DEFAULT_MODEL})")
    b.add_argument("--seq-len", type=_seq_len, default=2048, help="input length in tokens (default 2048)")
    b.add_argument("--format", choices=("json", "table"), default="json", help="output format (default json)")
    b.add_argument("--repeat", type=int, choices=range(1, 11), default=1, metavar="N",
                   help="timed passes per measurement, fastest kept (default 1)")
    b.add_argument("--paired", type=int, choices=range(0, 11), default=0, metavar="N",
                   help="also N rounds of the sdpa decoder forward and the census alternated in one process, "
                        "CPU time (the ratio least sensitive to the machine's drift; default 0: none)")
    b.add_argument("--no-cold-load", action="store_true", help="skip the cold load (GGUF conversion, ~20-60 s)")
    b.add_argument("--book", action="store_true",
                   help="only print the book's per-chapter execution times and their sum (no measurement)")
    b.add_argument("--timings", metavar="PATH",
                   help="the chapter timings file for --book (default _build/executed/timings.json, written by bookbuild)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except CatchtagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
