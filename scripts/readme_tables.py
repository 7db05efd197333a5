"""The README's strategy tables from an eval.py results folder: one row per strategy, one column per
budget and protocol, each cell the score ± its standard error and, below it, the paired difference from
the full cache on the same samples with its bootstrap 95% interval (eval.py's own statistics: points of
accuracy; perplexity in %; for fidelity the KL itself, in nats).

    python scripts/readme_tables.py results/tables/SmolLM2-135M-Instruct/rulerniah_single-2048

Cells with fewer samples than the most complete one are marked with their n, unfinished runs with the
samples they have; missing cells are blank."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as E  # noqa: E402

PROTOCOLS = ("context", "stream", "query-aware")


def cell_key(conf: dict) -> tuple[str, str, str]:
    """(strategy, budget as the fraction kept or read, protocol) of a config.json."""
    c = conf["cache"]
    s, p = c["strategy"], c["params"]
    if "spotlight_prune" in p:  # retrieval: the fraction read
        budget = f"{1 - p['spotlight_prune']:g}"
    elif "quest_budget" in p:
        budget = f"{p['quest_budget']:g}"
    else:
        budget = c["max_cache_length"][0] if s != "full" else "1"
    protocol = "query-aware" if conf["query_aware"] else c.get("protocol", "context")
    return s, f"{float(budget):g}", protocol


def main(folder: Path, resamples: int = 10_000):
    cells, most = {}, 0
    for d in sorted(p.parent for p in folder.glob("*/config.json")):
        rows = E.finished_rows(d)
        if not rows:
            continue
        conf = json.loads((d / "config.json").read_text())
        m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else None
        most = max(most, len(rows))
        if m is None:  # unfinished: no score yet
            cells[cell_key(conf)] = (None, None, len(rows), None, "")
            continue
        v = E.compare_with_full(d, m, rows, resamples)
        cells[cell_key(conf)] = (m["score"], m["score_stderr"], m["n"], v, E.paired_kind(m))
    budgets = sorted({k[1] for k in cells if k[0] != "full"}, key=float, reverse=True)
    cols = [(b, p) for b in budgets for p in PROTOCOLS if any(k[1:] == (b, p) for k in cells)]
    print("| strategy | " + " | ".join(f"{float(b):.0%} {p}" for b, p in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    full = [cells.get(("full", "1", p)) for p in PROTOCOLS]
    digits = 2 if any(c[4] == "ppl" for c in cells.values()) else 0
    print("| full | " + " / ".join(f"{c[0]:.{digits}f}" for c in full if c) + " |")
    for s in sorted({k[0] for k in cells} - {"full"}):
        out = []
        for b, p in cols:
            c = cells.get((s, b, p))
            if c is None:
                out.append("")
                continue
            score, se, n, v, kind = c
            if score is None:
                out.append(f"unfinished (n={n})")
                continue
            text = f"{score:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "") + (
                f" (n={n})" if n < most else "")
            if v and "mean" in v:
                lo, hi = (E.shown(kind, x) for x in v["ci95"])
                if kind == "kl":
                    text += f"<br>KL {v['mean']:.2f} [{lo:.2f}, {hi:.2f}]"
                else:
                    unit = "%" if kind == "ppl" else ""
                    text += f"<br>{E.shown(kind, v['mean']):+.0f}{unit} [{lo:+.0f}, {hi:+.0f}]"
            out.append(text)
        print(f"| {s} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
