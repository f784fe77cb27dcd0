"""The bench's book table (per-chapter times recorded by bookbuild) and its table of ratios: fast,
no model (tests/test_bench.py runs the measurements themselves and is slow)."""

import json

from catchtag import bench
from catchtag.cli import main


def test_book_timings_from_a_fake_timings_file(tmp_path, capsys):
    from catchtag.book.bookbuild import record_timing

    path = tmp_path / "executed" / "timings.json"
    record_timing("sinks", 12.34, {}, "2026-01-01 10:00 UTC", path)
    record_timing("catch", 20.0, {"n_prompts": 4}, "2026-01-01 10:01 UTC", path)
    record_timing("sinks", 10.0, {}, "2026-01-01 10:02 UTC", path)  # replaces the first run
    book = bench.book_timings(path)
    assert list(book["chapters"]) == ["catch", "sinks"]
    assert book["chapters"]["sinks"]["seconds"] == 10.0
    assert book["chapters"]["catch"]["parameters"] == {"n_prompts": 4}
    assert book["total_s"] == 30.0
    table = bench.format_book_timings(book)
    assert "n_prompts=4" in table and table.splitlines()[-1].split()[:2] == ["total", "30.0"]
    assert bench.book_timings(tmp_path / "none.json") is None
    assert main(["bench", "--book", "--timings", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_s"] == 30.0
    assert main(["bench", "--book", "--timings", str(path), "--format", "table"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["bench", "--book", "--timings", str(tmp_path / "none.json")]) == 2
    assert "execute the book first" in capsys.readouterr().err
    path.write_text("not json")
    record_timing("tag", 1.0, {}, "2026-01-01 10:03 UTC", path)  # an unreadable file is started afresh
    assert list(bench.book_timings(path)["chapters"]) == ["tag"]


def test_book_wall_time_is_kept_apart_from_the_chapters(tmp_path):
    from catchtag.book.bookbuild import record_book_wall, record_timing

    path = tmp_path / "timings.json"
    record_timing("sinks", 10.0, {}, "2026-01-01 10:00 UTC", path)
    record_timing("catch", 20.0, {}, "2026-01-01 10:00 UTC", path)
    record_book_wall(16.0, 2, ["sinks", "catch"], path)
    book = bench.book_timings(path)
    assert list(book["chapters"]) == ["catch", "sinks"] and book["total_s"] == 30.0  # "_book" is not a chapter
    assert book["wall"]["seconds"] == 16.0 and book["wall"]["jobs"] == 2
    last = bench.format_book_timings(book).splitlines()[-1]
    assert last.split()[:3] == ["wall", "clock", "16.0"] and "up to 2 at once" in last


def test_table_shows_cpu_ratios_and_book_timings():
    r = {"model": "m", "seq_len": 8, "threads": 1, "attention_stack_mb": 1.0, "sdpa_s": 1.0, "sdpa_peak_mb": 1.0,
         "sdpa_decoder_s": 0.9, "naive_s": None, "naive_peak_mb": None, "naive_run": False,
         "capture_path_s": 2.0, "capture_path_peak_mb": 1.0, "streaming_capture_s": 1.0, "streaming_stats_s": 1.0,
         "census_s": 1.5, "census_peak_mb": 0.1, "max_abs_diff_against": "capture", "streaming_path": "census",
         "max_abs_diff": 0.0, "top_key_equal": True, "census_vs_capture_max_abs_diff": 0.0, "load_gguf_s": None,
         "load_cached_s": 1.0, "census_over_sdpa": 1.5, "census_over_sdpa_decoder": 1.67,
         "census_peak_over_stack": 0.1, "capture_path_over_sdpa": 2.0, "cached_over_cold": None,
         "sdpa_cpu_s": 1.0, "sdpa_decoder_cpu_s": 0.8, "census_cpu_s": 1.1, "census_over_sdpa_cpu": 1.1,
         "census_over_sdpa_decoder_cpu": 1.375,
         "book_timings": {"path": "x", "chapters": {"a": {"seconds": 2.0}}, "total_s": 2.0}}
    table = bench.format_table(r)
    assert "census/sdpa 1.10" in table and "/decoder-only 1.38" in table
    assert table.splitlines()[-1].startswith("total") and "a " in table
