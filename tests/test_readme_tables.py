"""scripts/readme_tables.py --kv_bits: the quantized grid's table from result folders, on hand-made rows."""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import readme_tables as RT  # noqa: E402


def run(folder: Path, name: str, strategy: str, budget, bits: int, nll: dict, nbytes: float):
    d = folder / name
    d.mkdir(parents=True)
    cache = {"strategy": strategy, "params": {}, "max_cache_length": [budget], "protocol": "context", "kv_bits": bits}
    (d / "config.json").write_text(json.dumps({"cache": cache, "query_aware": False, "dtype": "float32"}))
    # written out of order: the table must take the first windows in the task's order (by start, then book)
    rows = [{"id": i, "score": v, "cache_bytes": nbytes, "n_prompt": 2048} for i, v in reversed(list(nll.items()))]
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_kv_bits_table_first_windows_paired_with_the_16_bit_full_cache(tmp_path, capsys):
    folder = tmp_path / "ppl-pg19-2048-p1536"
    ids = ["0-0", "1-0", "0-2048"]
    run(folder, "full-aaa", "full", 1.0, 16, dict(zip(ids, [1.0, 2.0, 3.0])), 2048 * 1024 * 60)
    run(folder, "full-kv_bits=4-bbb", "full", 1.0, 4, dict(zip(ids, [1.1, 2.1, 9.0])), 2048 * 1024 * 17)
    run(folder, "snapkv-0.5-kv_bits=2-ccc", "snapkv", 0.5, 2, dict(zip(ids, [1.2, 2.4, 9.0])), 2048 * 1024 * 10)
    run(folder, "snapkv-0.1-ddd", "snapkv", 0.1, 16, dict(zip(ids, [5.0, 5.0, 5.0])), 2048 * 1024 * 6)  # not in the grid
    RT.kv_bits_table(folder, 2, 200, tmp_path / "plot.png")
    out = capsys.readouterr().out
    lines = {ln.split(" | ")[0]: ln.split(" | ")[1:] for ln in out.splitlines() if ln.startswith("| ")}
    assert list(lines)[0] == "| configuration" and lines["| configuration"][:3] == ["16-bit", "4-bit", "2-bit |"]
    full, snap = lines["| full"], lines["| snapkv 50%"]
    assert full[0].startswith(f"{math.exp(1.5):.2f} ± ") and full[0].endswith("60.0 KiB")
    # 4-bit: NLL 1.1 and 2.1 against 1.0 and 2.0 on the same two windows: +10.5% with a degenerate interval
    assert full[1].startswith(f"{math.exp(1.6):.2f} ± ") and "+10.5% [+10.5, +10.5]" in full[1]
    lo, hi = sorted(100 * math.expm1(x) for x in (0.2, 0.4))
    assert f"{100 * math.expm1(0.3):+.1f}% [{lo:+.1f}, {hi:+.1f}]" in snap[2] and snap[2].endswith("10.0 KiB |")
    assert "snapkv 10%" not in out and "n = 2 per cell (each run's first 2)" in out
    assert (tmp_path / "plot.png").stat().st_size > 0
