"""Benchmark: the sink census without the L x H x T x T attention stack, and the model cache.

    python -m catchtag bench --model smollm2-135m --seq-len 2048 --format table

measures, on one input of exactly `seq_len` tokens (the book's passages repeated, then truncated):

- `sdpa`: a plain transformers forward pass (sdpa attention, with the logits), the cost of running
  the model at all; `sdpa_decoder_s` times the same pass without the output layer (no T x vocab
  logits), which is what the census runs;
- `naive`: the census as published sink studies collect it: eager attention with
  `output_attentions=True`, which returns every layer's (H, T, T) probabilities, then the sink
  statistics from those full maps (`stats_from_probs`);
- `capture`: catchtag's capture-path census: `capture` (attention-call inputs only, `resid=False`,
  keys and values per kv head) then `sink_stats`, which recomputes the probabilities one layer and
  one chunk of queries at a time (what runs on NDIF, and the cross-check);
- `census`: catchtag's census inside the forward pass (`census_attention.census_forward`): one
  forward of the decoder (no logits) whose attention function computes each layer's output block by
  block and accumulates the census sums in the same pass; no q, k, v stored;
- `*_cpu_s`: the same passes' CPU time (`time.process_time`, all threads of the process): on a
  machine shared with other work the wall-clock ratios swing with the load, the CPU-time ratios
  much less (`census_over_sdpa_cpu`, `census_over_sdpa_decoder_cpu`);
- `book_timings`: the book's per-chapter execution times recorded by `catchtag.book.bookbuild`
  (`_build/executed/timings.json`), with their sum, when that file exists (`book_timings()`);
- `streaming_*`: the faster of the two census paths (`streaming_path` names it);
- the naive census is run only when the full attention stack is at most `NAIVE_MAX_STACK_MB`
  (6 GiB: T = 2048 for SmolLM2); beyond, `naive_s` and `naive_peak_mb` are null and the stack size
  (`attention_stack_mb`, L x H x T x T x 4 bytes) is reported as computed, and `max_abs_diff`
  compares the two catchtag paths instead (`max_abs_diff_against` says which);
- `load_gguf_s`: a cold load (GGUF conversion and cache write) into a fresh temporary
  `CATCHTAG_CACHE`, and `load_cached_s`: a load from a valid cache entry (the fastest of the cached
  loads this run made);
- `max_abs_diff`: the largest |alpha_naive - alpha_streaming| over layers, heads and keys. The two
  censuses come from two forward passes (eager and sdpa attention), whose float32 rounding differs
  slightly and compounds over layers, so this bounds the forward's numerics as well as the census
  algorithm; `top_key_equal` likewise can flip on a near-tie between two keys.

Method. Each measurement runs in its own fresh Python process (the model loaded from the cache,
one warm-up pass at 16 tokens, then the timed pass), so one measurement's freed memory, which the
C allocator may keep, cannot hide in the next one's baseline. Time is wall-clock
(`time.perf_counter`). Peak extra memory is the peak resident set size (RSS) during the timed pass
minus the RSS just before it, in MiB: the kernel's own high-water mark (`VmHWM`, reset through
`/proc/self/clear_refs` just before the pass) where Linux allows it, and otherwise a background
thread sampling RSS every 5 ms (psutil). `tracemalloc` does not see torch's allocations, which is
why RSS is used. Timings on a shared machine are noisy: compare the ratios of one run, never
numbers across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .errors import CatchtagError

KEYS = (
    "seq_len", "sdpa_s", "naive_s", "streaming_s", "naive_peak_mb", "streaming_peak_mb",
    "max_abs_diff", "load_gguf_s", "load_cached_s",
)
WARMUP_TOKENS = 16
NAIVE_MAX_STACK_MB = 6 * 1024
MIB = 1 << 20


# --------------------------------------------------------------------------------------------------
# Input and memory measurement


def bench_ids(model, seq_len: int) -> torch.Tensor:
    """Exactly `seq_len` token ids: catchtag.prompts.PASSAGES repeated, tokenised, truncated."""
    from .prompts import PASSAGES

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 8:
        raise CatchtagError(f"seq-len {seq_len!r} is not valid: use a whole number of tokens >= 8")
    if seq_len > model.max_length:
        raise CatchtagError(
            f"seq-len {seq_len} is more than {model.name}'s context of {model.max_length} tokens"
        )
    cycle = "\n\n".join(PASSAGES)
    text = cycle
    while True:
        ids = model.tokenize(text)
        if len(ids) >= seq_len:
            return torch.tensor(ids[:seq_len], dtype=torch.long)
        text = text + "\n\n" + cycle


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _hwm() is not None
    except OSError:
        return False


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak RSS increase over the block, in MiB (`extra_mb`): the kernel's high-water mark (VmHWM,
    reset on entry through /proc/self/clear_refs), or, where that cannot be reset, the resident
    set sampled every 5 ms by a thread. The sampling thread cost the measured pass 2-9% of CPU
    (the census and the sdpa forward at T = 2048 and 8192, alternated with and without it), so it
    runs only when it must: `method` says which was used; `sampled_peak` is the largest resident set
    the thread itself read (bytes; 0 when no thread ran)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.extra_mb = float("nan")
        self.method = ""
        self._thread = None

    def _sample(self):
        while not self._stop.wait(self.interval):
            rss = _rss()
            self.sampled_peak = max(self.sampled_peak, rss)     # what the thread itself saw (bytes)
            self._peak = max(self._peak, rss)

    def __enter__(self):
        gc.collect()
        self._hwm_ok = _reset_hwm()
        self.base = _rss()
        self._peak = self.base
        self.sampled_peak = 0
        if not self._hwm_ok:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = max(self._peak, _rss())
        self.method = "rss sampled every 5 ms" if self._thread is not None else "rss at start and end"
        if self._hwm_ok:
            hwm = _hwm()
            if hwm is not None:
                peak = max(peak, hwm)
                self.method = "VmHWM (reset via /proc/self/clear_refs)"
        self.extra_mb = (peak - self.base) / MIB
        return False


# --------------------------------------------------------------------------------------------------
# The three measured paths (each returns what it computed, so the census paths can be compared)


def run_sdpa(model, ids: torch.Tensor):
    with torch.no_grad():
        model.hf(ids[None, :])
    return None


def run_naive(model, ids: torch.Tensor):
    """Eager attention with output_attentions=True, then the sink statistics from the full maps."""
    from .sinks import stats_from_probs

    hf = model.hf
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(ids[None, :], output_attentions=True)
        per = [stats_from_probs(a[0]) for a in out.attentions]
    finally:
        hf.set_attn_implementation(previous)
    return torch.stack([p.received for p in per]), torch.stack([p.top_key for p in per])


def run_sdpa_decoder(model, ids: torch.Tensor):
    with torch.no_grad():
        model.hf.model(ids[None, :], use_cache=False)
    return None


def run_capture(model, ids: torch.Tensor, timings: dict | None = None):
    """catchtag's capture path: capture the attention-call inputs (resid=False), then sink_stats."""
    from .capture import capture_ids
    from .sinks import sink_stats

    start = time.perf_counter()
    cap = capture_ids(model, ids, resid=False)
    mid = time.perf_counter()
    st = sink_stats(cap)
    if timings is not None:
        timings["capture_s"] = mid - start
        timings["stats_s"] = time.perf_counter() - mid
    return st.received, st.top_key


def run_census(model, ids: torch.Tensor, timings: dict | None = None):
    """catchtag's census inside the forward pass (census_attention.census_forward)."""
    from .census_attention import census_forward

    st = census_forward(model, ids)
    return st.received, st.top_key


RUNNERS = {"sdpa": run_sdpa, "naive": run_naive, "capture": run_capture, "census": run_census}


# --------------------------------------------------------------------------------------------------
# One measurement per process


def _timed_load(name: str):
    from .models import load_model

    start = time.perf_counter()
    model = load_model(name)
    return model, time.perf_counter() - start


def worker(kind: str, name: str, seq_len: int, out: Path, repeat: int = 1) -> dict:
    """Run one measurement in this (fresh) process; write out/<kind>.json (and .pt for a census)."""
    import transformers  # noqa: F401  (imports are not part of the load time)
    import nnsight  # noqa: F401

    if kind == "paired":
        result = _paired_rounds(name, seq_len, repeat)
    elif kind == "cold":
        from .models import REGISTRY, cache_dir_for

        if name not in REGISTRY:
            raise CatchtagError(f"a cold load needs a registry model ({', '.join(REGISTRY)}), not {name!r}")
        if cache_dir_for(REGISTRY[name].sha256).exists():
            raise CatchtagError("the cold load must start from an empty CATCHTAG_CACHE")
        _, cold = _timed_load(name)
        _, cached = _timed_load(name)
        result = {"load_gguf_s": cold, "load_cached_s": cached}
    else:
        model, load_s = _timed_load(name)
        ids = bench_ids(model, seq_len)
        run = RUNNERS[kind]
        run(model, ids[:WARMUP_TOKENS])
        times, cpu, peak, method, timings, computed = [], [], None, "", {}, None
        for i in range(max(1, repeat)):
            extra = {}
            with PeakRSS() as mem:
                start, start_cpu = time.perf_counter(), time.process_time()
                computed = run(model, ids, extra) if kind in ("capture", "census") else run(model, ids)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            if peak is None:  # later passes may reuse memory the allocator kept: count the first
                peak, method = mem.extra_mb, mem.method
            if times[-1] == min(times):
                timings = extra
        if kind == "sdpa":  # the same forward without the output layer (what the census runs)
            run_sdpa_decoder(model, ids[:WARMUP_TOKENS])
            dec, dec_cpu = [], []
            for i in range(max(1, repeat)):
                with PeakRSS():  # timed as the census pass is (a sampling thread where VmHWM cannot be reset)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    run_sdpa_decoder(model, ids)
                    dec.append(time.perf_counter() - start)
                    dec_cpu.append(time.process_time() - start_cpu)
            timings["decoder_s"] = min(dec)
            timings["decoder_cpu_s"] = min(dec_cpu)
        result = {
            "seconds": min(times), "cpu_s": min(cpu), "peak_mb": peak, "load_cached_s": load_s,
            "memory_method": method,
            "threads": torch.get_num_threads(), **timings,
            "model": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads,
        }
        if kind in ("naive", "capture", "census"):
            received, top_key = computed
            torch.save({"received": received, "top_key": top_key}, out / f"{kind}.pt")
    (out / f"{kind}.json").write_text(json.dumps(result))
    return result


def _paired_rounds(name: str, seq_len: int, rounds: int) -> dict:
    """In one process, `rounds` rounds of (sdpa decoder forward, census forward), alternated, CPU
    time each: the machine's speed drifts between the separate processes of the other
    measurements (on the development machine the same sdpa forward at T = 8192 took 46 to 62 s of
    CPU in one afternoon, more than the effect measured), while within a round both passes meet the
    same conditions. Returns {"sdpa_decoder_cpu_s": [...], "census_cpu_s": [...], "ratios": [...]}
    (census / sdpa per round)."""
    model, _ = _timed_load(name)
    ids = bench_ids(model, seq_len)
    run_sdpa_decoder(model, ids[:WARMUP_TOKENS])
    run_census(model, ids[:WARMUP_TOKENS])
    sd, ce = [], []
    for _ in range(max(1, rounds)):
        for run, times in ((run_sdpa_decoder, sd), (run_census, ce)):
            start = time.process_time()
            run(model, ids)
            times.append(time.process_time() - start)
    return {"sdpa_decoder_cpu_s": sd, "census_cpu_s": ce, "ratios": [c / s for c, s in zip(ce, sd)],
            "threads": torch.get_num_threads()}


def _spawn(kind: str, name: str, seq_len: int, out: Path, repeat: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "catchtag.bench", "--worker", kind, "--model", name,
           "--seq-len", str(seq_len), "--out", str(out), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise CatchtagError(f"bench {kind} run failed: {last.removeprefix('error: ')}")
    return json.loads((out / f"{kind}.json").read_text())


def run_bench(name: str = "smollm2-135m", seq_len: int = 2048, cold_load: bool = True,
              repeat: int = 1, progress=None, paired: int = 0) -> dict:
    """Every measurement, each in a fresh process, and the comparison of the censuses. With
    `paired` > 0, also that many alternated rounds of the sdpa decoder forward and the census in
    one more process (`_paired_rounds`): `census_over_sdpa_decoder_cpu_paired` is the median of the
    rounds' ratios, `paired_ratios` the ratios."""
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="catchtag-bench-") as tmp:
        out = Path(tmp)
        res = {}
        say(f"[bench] sdpa at T={seq_len} ...")
        res["sdpa"] = _spawn("sdpa", name, seq_len, out, repeat)
        L, H = res["sdpa"]["n_layers"], res["sdpa"]["n_heads"]
        stack_mb = L * H * seq_len * seq_len * 4 / MIB
        kinds = ("naive", "capture", "census") if stack_mb <= NAIVE_MAX_STACK_MB else ("capture", "census")
        if "naive" not in kinds:
            say(f"[bench] naive census not run: its attention stack would be {stack_mb / 1024:.1f} GiB")
        for kind in kinds:
            say(f"[bench] {kind} at T={seq_len} ...")
            res[kind] = _spawn(kind, name, seq_len, out, repeat)
        if paired > 0:
            say(f"[bench] {paired} alternated rounds of the sdpa decoder forward and the census at T={seq_len} ...")
            res["paired"] = _spawn("paired", name, seq_len, out, paired)
        cold = None
        if cold_load:
            say("[bench] cold load (GGUF conversion into a fresh cache) ...")
            cache = out / "cache"
            cache.mkdir()
            cold = _spawn("cold", name, seq_len, out, 1, env={"CATCHTAG_CACHE": str(cache)})
        loaded = {kind: torch.load(out / f"{kind}.pt") for kind in kinds}

    def compare(a, b):
        ra, rb = a["received"].double(), b["received"].double()
        if not torch.equal(torch.isnan(ra), torch.isnan(rb)):
            raise CatchtagError("the censuses disagree on which keys have an alpha")
        return float((torch.nan_to_num(ra) - torch.nan_to_num(rb)).abs().max()), bool(torch.equal(a["top_key"], b["top_key"]))

    fast = min(("census", "capture"), key=lambda k: res[k]["seconds"])
    against = "naive" if "naive" in kinds else ("capture" if fast == "census" else "census")
    diff, top_equal = compare(loaded[against], loaded[fast])
    paths_diff, _ = compare(loaded["capture"], loaded["census"])
    s, c, cp, sd = res[fast], res["census"], res["capture"], res["sdpa"]
    naive = res.get("naive")
    cached = [r["load_cached_s"] for r in res.values() if "load_cached_s" in r] + ([cold["load_cached_s"]] if cold else [])
    result = {
        "model": s["model"],
        "seq_len": seq_len,
        "sdpa_s": sd["seconds"],
        "naive_s": naive["seconds"] if naive else None,
        "streaming_s": s["seconds"],
        "sdpa_peak_mb": sd["peak_mb"],
        "naive_peak_mb": naive["peak_mb"] if naive else None,
        "streaming_peak_mb": s["peak_mb"],
        "max_abs_diff": diff,
        "max_abs_diff_against": against,
        "top_key_equal": top_equal,
        "load_gguf_s": cold["load_gguf_s"] if cold else None,
        "load_cached_s": min(cached),
        "streaming_path": fast,
        "sdpa_decoder_s": sd.get("decoder_s"),
        "census_s": c["seconds"],
        "census_peak_mb": c["peak_mb"],
        "capture_path_s": cp["seconds"],
        "capture_path_peak_mb": cp["peak_mb"],
        "streaming_capture_s": cp.get("capture_s"),
        "streaming_stats_s": cp.get("stats_s"),
        "census_vs_capture_max_abs_diff": paths_diff,
        "attention_stack_mb": stack_mb,
        "naive_run": naive is not None,
        "streaming_over_sdpa": s["seconds"] / sd["seconds"],
        "census_over_sdpa": c["seconds"] / sd["seconds"],
        "census_over_sdpa_decoder": c["seconds"] / sd["decoder_s"] if sd.get("decoder_s") else None,
        "sdpa_cpu_s": sd["cpu_s"],
        "sdpa_decoder_cpu_s": sd.get("decoder_cpu_s"),
        "census_cpu_s": c["cpu_s"],
        "capture_path_cpu_s": cp["cpu_s"],
        "census_over_sdpa_cpu": c["cpu_s"] / sd["cpu_s"],
        "census_over_sdpa_decoder_cpu": c["cpu_s"] / sd["decoder_cpu_s"] if sd.get("decoder_cpu_s") else None,
        "capture_path_over_sdpa": cp["seconds"] / sd["seconds"],
        "naive_over_sdpa": naive["seconds"] / sd["seconds"] if naive else None,
        "streaming_peak_over_stack": s["peak_mb"] / stack_mb,
        "census_peak_over_stack": c["peak_mb"] / stack_mb,
        "capture_path_peak_over_stack": cp["peak_mb"] / stack_mb,
        "naive_peak_over_stack": naive["peak_mb"] / stack_mb if naive else None,
        "cached_over_cold": min(cached) / cold["load_gguf_s"] if cold else None,
        "census_over_sdpa_decoder_cpu_paired": float(statistics.median(res["paired"]["ratios"])) if paired > 0 else None,
        "paired_ratios": [round(x, 4) for x in res["paired"]["ratios"]] if paired > 0 else None,
        "threads": s["threads"],
        "repeat": repeat,
        "memory_method": s["memory_method"],
    }
    result = {k: (round(v, 9 if "max_abs_diff" in k else 4) if isinstance(v, float) else v) for k, v in result.items()}
    book = book_timings()
    if book is not None:
        result["book_timings"] = book
    return result


def book_timings(path: Path | str | None = None) -> dict | None:
    """The book's per-chapter execution times, as `catchtag.book.bookbuild` records them
    (`_build/executed/timings.json`: {chapter: {seconds, executed_at, parameters, ...}}, each
    chapter's last execution), with `total_s`, their sum, and `wall` (the last build's wall-clock
    execution time: {seconds, jobs, chapters, ...}, the entry "_book"; None when not recorded);
    None when there is no such file.

    The times come from whichever runs executed the chapters (dates, parameters and threads are in
    each entry): a sum over chapters executed under different conditions is only indicative."""
    if path is None:
        from .book.bookbuild import TIMINGS

        path = TIMINGS
    path = Path(path)
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
    except ValueError:
        raise CatchtagError(f"{path} is not a JSON file of chapter timings: delete it or rebuild the book") from None
    chapters, wall = {}, None
    for name, entry in sorted(table.items()) if isinstance(table, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("seconds"), (int, float)):
            if name == "_book":
                wall = entry
            else:
                chapters[name] = entry
    return {"path": str(path), "chapters": chapters,
            "total_s": round(sum(e["seconds"] for e in chapters.values()), 1), "wall": wall}


def format_book_timings(book: dict) -> str:
    """The book's per-chapter times as a table (one line per chapter, then the sum)."""
    lines = [f"book: each chapter's last execution ({book['path']})",
             f"{'chapter':<16} {'seconds':>9}  {'executed':<20} {'threads':>7}  parameters"]
    for name, e in book["chapters"].items():
        params = " ".join(f"{k}={v}" for k, v in (e.get("parameters") or {}).items()) or "defaults"
        threads = e.get("omp_num_threads") or f"({e.get('cpus', '?')} cpus)"
        lines.append(f"{name:<16} {e['seconds']:>9.1f}  {e.get('executed_at', '?'):<20} {threads:>7}  {params}")
    lines.append(f"{'total':<16} {book['total_s']:>9.1f}  ({len(book['chapters'])} chapters, the sum)")
    wall = book.get("wall")
    if wall:
        lines.append(f"{'wall clock':<16} {wall['seconds']:>9.1f}  {wall.get('executed_at', '?'):<20} "
                     f"the last build: {len(wall.get('chapters', []))} chapters, up to {wall.get('jobs', '?')} at once")
    return "\n".join(lines)


def format_table(r: dict) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    naive_note = "" if r["naive_run"] else "  (not run: the stack would not fit)"
    lines = [
        f"model {r['model']}  T={r['seq_len']}  threads {r['threads']}  "
        f"(full attention stack L*H*T*T*4 bytes = {r['attention_stack_mb']:.1f} MiB)",
        f"{'path':<40} {'seconds':>9} {'peak extra MiB':>15}",
        f"{'sdpa forward':<40} {r['sdpa_s']:>9.3f} {r['sdpa_peak_mb']:>15.1f}",
        f"{'  same, without the output layer':<40} {f(r['sdpa_decoder_s'], '>9.3f')}",
        f"{'naive census (eager, full maps)':<40} {f(r['naive_s'], '>9.3f')} {f(r['naive_peak_mb'], '>15.1f')}{naive_note}",
        f"{'capture path (capture + sink_stats)':<40} {r['capture_path_s']:>9.3f} {r['capture_path_peak_mb']:>15.1f}",
        f"  capture {f(r['streaming_capture_s'], '.3f')} s, sink_stats {f(r['streaming_stats_s'], '.3f')} s",
        f"{'census in the forward (census_forward)':<40} {r['census_s']:>9.3f} {r['census_peak_mb']:>15.1f}",
        f"max |alpha_{r['max_abs_diff_against']} - alpha_{r['streaming_path']}| = {r['max_abs_diff']:.2e}  "
        f"(top keys equal: {r['top_key_equal']}); capture path vs census {r['census_vs_capture_max_abs_diff']:.2e}",
        f"load: cold (GGUF conversion) {f(r['load_gguf_s'], '.2f')} s, cached {r['load_cached_s']:.2f} s",
        f"ratios: census/sdpa time {r['census_over_sdpa']:.2f} (target <= 1.2; "
        f"/decoder-only sdpa {f(r['census_over_sdpa_decoder'], '.2f')}), "
        f"census peak/stack {r['census_peak_over_stack']:.3f} (target <= 0.05), "
        f"capture path/sdpa {r['capture_path_over_sdpa']:.2f}, cached/cold load {f(r['cached_over_cold'], '.3f')}",
        f"cpu time (less sensitive to other processes' load): sdpa {r['sdpa_cpu_s']:.3f} s, decoder-only "
        f"{f(r['sdpa_decoder_cpu_s'], '.3f')} s, census {r['census_cpu_s']:.3f} s: census/sdpa "
        f"{r['census_over_sdpa_cpu']:.2f}, /decoder-only {f(r['census_over_sdpa_decoder_cpu'], '.2f')}",
    ]
    if r.get("paired_ratios"):
        lines.append(f"alternated in one process, census/decoder-only sdpa cpu per round: "
                     f"{', '.join(f'{x:.2f}' for x in r['paired_ratios'])} (median "
                     f"{r['census_over_sdpa_decoder_cpu_paired']:.2f})")
    if r.get("book_timings"):
        lines += ["", format_book_timings(r["book_timings"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Worker entry point (`python -m catchtag.bench --worker KIND ...`); users run `catchtag bench`."""
    p = argparse.ArgumentParser(prog="python -m catchtag.bench")
    p.add_argument("--worker", choices=("sdpa", "naive", "capture", "census", "cold", "paired"), required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", required=True)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    try:
        worker(args.worker, args.model, args.seq_len, Path(args.out), args.repeat)
    except CatchtagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
