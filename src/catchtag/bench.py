"""Benchmark: the sink census without the L x H x T x T attention stack, and the model cache.

    python -m catchtag bench --model smollm2-135m --seq-len 2048 --format table

measures, on one input of exactly `seq_len` tokens (the book's passages repeated, then truncated):

- `sdpa`: a plain transformers forward pass (sdpa attention), the cost of running the model at all;
- `naive`: the census as published sink studies collect it: eager attention with
  `output_attentions=True`, which returns every layer's (H, T, T) probabilities, then the sink
  statistics from those full maps (`stats_from_probs`);
- `streaming`: catchtag's census: `capture` (attention-call inputs only, `resid=False`) then
  `sink_stats`, which recomputes the probabilities one layer and one chunk of queries at a time;
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
    """Peak RSS increase over the block, in MiB (`extra_mb`): kernel high-water mark and 5 ms sampling."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.extra_mb = float("nan")
        self.method = ""

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())

    def __enter__(self):
        gc.collect()
        self._hwm_ok = _reset_hwm()
        self.base = _rss()
        self._peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = max(self._peak, _rss())
        self.method = "rss sampled every 5 ms"
        if self._hwm_ok:
            hwm = _hwm()
            if hwm is not None:
                peak = max(peak, hwm)
                self.method = "VmHWM (reset via /proc/self/clear_refs) and rss sampled every 5 ms"
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


def run_streaming(model, ids: torch.Tensor, timings: dict | None = None):
    """catchtag's path: capture the attention-call inputs (resid=False), then sink_stats."""
    from .capture import attention_op_name, _capture_one
    from .sinks import sink_stats

    start = time.perf_counter()
    layers = list(range(model.n_layers))
    cap = _capture_one(model, "", ids, layers, False, False, {}, attention_op_name(model))
    mid = time.perf_counter()
    st = sink_stats(cap)
    if timings is not None:
        timings["capture_s"] = mid - start
        timings["stats_s"] = time.perf_counter() - mid
    return st.received, st.top_key


RUNNERS = {"sdpa": run_sdpa, "naive": run_naive, "streaming": run_streaming}


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

    if kind == "cold":
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
        times, peak, method, timings, computed = [], None, "", {}, None
        for i in range(max(1, repeat)):
            extra = {}
            with PeakRSS() as mem:
                start = time.perf_counter()
                computed = run(model, ids, extra) if kind == "streaming" else run(model, ids)
                times.append(time.perf_counter() - start)
            if peak is None:  # later passes may reuse memory the allocator kept: count the first
                peak, method = mem.extra_mb, mem.method
            if times[-1] == min(times):
                timings = extra
        result = {
            "seconds": min(times), "peak_mb": peak, "load_cached_s": load_s, "memory_method": method,
            "threads": torch.get_num_threads(), **timings,
            "model": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads,
        }
        if kind in ("naive", "streaming"):
            received, top_key = computed
            torch.save({"received": received, "top_key": top_key}, out / f"{kind}.pt")
    (out / f"{kind}.json").write_text(json.dumps(result))
    return result


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
              repeat: int = 1, progress=None) -> dict:
    """Every measurement, each in a fresh process, and the comparison of the two censuses."""
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="catchtag-bench-") as tmp:
        out = Path(tmp)
        res = {}
        for kind in ("sdpa", "naive", "streaming"):
            say(f"[bench] {kind} at T={seq_len} ...")
            res[kind] = _spawn(kind, name, seq_len, out, repeat)
        cold = None
        if cold_load:
            say("[bench] cold load (GGUF conversion into a fresh cache) ...")
            cache = out / "cache"
            cache.mkdir()
            cold = _spawn("cold", name, seq_len, out, 1, env={"CATCHTAG_CACHE": str(cache)})
        a = torch.load(out / "naive.pt")
        b = torch.load(out / "streaming.pt")
    ra, rb = a["received"].double(), b["received"].double()
    if not torch.equal(torch.isnan(ra), torch.isnan(rb)):
        raise CatchtagError("the naive and streaming censuses disagree on which keys have an alpha")
    diff = float((torch.nan_to_num(ra) - torch.nan_to_num(rb)).abs().max())
    s = res["streaming"]
    L, H = s["n_layers"], s["n_heads"]
    stack_mb = L * H * seq_len * seq_len * 4 / MIB
    cached = [r["load_cached_s"] for r in res.values()] + ([cold["load_cached_s"]] if cold else [])
    result = {
        "model": s["model"],
        "seq_len": seq_len,
        "sdpa_s": res["sdpa"]["seconds"],
        "naive_s": res["naive"]["seconds"],
        "streaming_s": s["seconds"],
        "sdpa_peak_mb": res["sdpa"]["peak_mb"],
        "naive_peak_mb": res["naive"]["peak_mb"],
        "streaming_peak_mb": s["peak_mb"],
        "max_abs_diff": diff,
        "top_key_equal": bool(torch.equal(a["top_key"], b["top_key"])),
        "load_gguf_s": cold["load_gguf_s"] if cold else None,
        "load_cached_s": min(cached),
        "streaming_capture_s": s.get("capture_s"),
        "streaming_stats_s": s.get("stats_s"),
        "attention_stack_mb": stack_mb,
        "streaming_over_sdpa": s["seconds"] / res["sdpa"]["seconds"],
        "naive_over_sdpa": res["naive"]["seconds"] / res["sdpa"]["seconds"],
        "streaming_peak_over_stack": s["peak_mb"] / stack_mb,
        "naive_peak_over_stack": res["naive"]["peak_mb"] / stack_mb,
        "cached_over_cold": min(cached) / cold["load_gguf_s"] if cold else None,
        "threads": s["threads"],
        "repeat": repeat,
        "memory_method": s["memory_method"],
    }
    return {k: (round(v, 9 if k == "max_abs_diff" else 4) if isinstance(v, float) else v) for k, v in result.items()}


def format_table(r: dict) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"model {r['model']}  T={r['seq_len']}  threads {r['threads']}  "
        f"(full attention stack L*H*T*T*4 bytes = {r['attention_stack_mb']:.1f} MiB)",
        f"{'path':<34} {'seconds':>9} {'peak extra MiB':>15}",
        f"{'sdpa forward':<34} {r['sdpa_s']:>9.3f} {r['sdpa_peak_mb']:>15.1f}",
        f"{'naive census (eager, full maps)':<34} {r['naive_s']:>9.3f} {r['naive_peak_mb']:>15.1f}",
        f"{'streaming census (catchtag)':<34} {r['streaming_s']:>9.3f} {r['streaming_peak_mb']:>15.1f}",
        f"  capture {f(r['streaming_capture_s'], '.3f')} s, sink_stats {f(r['streaming_stats_s'], '.3f')} s",
        f"max |alpha_naive - alpha_streaming| = {r['max_abs_diff']:.2e}  (top keys equal: {r['top_key_equal']})",
        f"load: cold (GGUF conversion) {f(r['load_gguf_s'], '.2f')} s, cached {r['load_cached_s']:.2f} s",
        f"ratios: streaming/sdpa time {r['streaming_over_sdpa']:.2f} (target <= 1.25), "
        f"streaming peak/stack {r['streaming_peak_over_stack']:.3f} (target <= 0.10), "
        f"cached/cold load {f(r['cached_over_cold'], '.3f')}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Worker entry point (`python -m catchtag.bench --worker KIND ...`); users run `catchtag bench`."""
    p = argparse.ArgumentParser(prog="python -m catchtag.bench")
    p.add_argument("--worker", choices=("sdpa", "naive", "streaming", "cold"), required=True)
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
