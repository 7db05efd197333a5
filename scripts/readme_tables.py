"""The README's strategy tables from an eval.py results folder: one row per strategy, one column per
budget and protocol, each cell the score ± its standard error and, below it, the paired difference from
the full cache on the same samples with its bootstrap 95% interval (eval.py's own statistics: points of
accuracy; perplexity in %; for fidelity the KL itself, in nats).

    python scripts/readme_tables.py results/tables/SmolLM2-135M-Instruct/rulerniah_single-2048 \
        --plot docs/tables-rulerniah_single-2048.png      # and the Pareto plot: a panel per protocol

Cells with fewer samples than the most complete one are marked with their n, unfinished runs with the
samples they have; missing cells are blank. Quantized runs (--kv_bits below 16) are left out; --kv_bits
makes their table instead (issue 12's grid): a row per strategy and budget, a column per width, each cell
the score, its difference from the 16-bit full cache and the allocated KiB per prompt token; --first N
keeps each run's first N samples in the task's order (windows "book-start": by start, then book), so
every cell is measured on the same samples.

    python scripts/readme_tables.py results/tables/SmolLM2-135M-Instruct/ppl-pg19-2048-p1536 --kv_bits \
        --first 20 --plot docs/kv-bits-ppl-pg19.png      # the plot: score against KiB per prompt token"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as E  # noqa: E402
import tasks as T  # noqa: E402

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


def plot(points: dict, path: Path, title: str, ylabel: str):
    """Pareto panels, one per protocol: the score (fidelity: the KL) against the allocated KV cache in KiB
    per prompt token, a line per strategy through its budgets, one colour per strategy in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    protocols = [p for p in PROTOCOLS if any(k[1] == p and k[0] != "full" for k in points)]
    strategies = sorted({k[0] for k in points}, key=lambda s: (s != "full", s))
    colors = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 5), squeeze=False, sharey=True)
    for ax, protocol in zip(axes[0], protocols):
        for i, s in enumerate(strategies):
            pts = sorted(points.get((s, protocol), []))
            if pts:
                x, y, err = zip(*pts)
                ax.errorbar(x, y, yerr=err, label=s, color=colors(i % 20), marker="*" if s == "full" else
                            "os^vD<>pXh"[i % 10], markersize=12 if s == "full" else 5, capsize=2, alpha=0.85)
        ax.set_title(f"{title}: {protocol}")
        ax.set_xlabel("allocated KV cache, KiB per prompt token (this run's dtype)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))  # room for the legend
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(folder: Path, resamples: int = 10_000, plot_path: Path | None = None):
    cells, most, points, ylabel = {}, 0, {}, ""
    for d in sorted(p.parent for p in folder.glob("*/config.json")):
        rows = E.finished_rows(d)
        if not rows:
            continue
        conf = json.loads((d / "config.json").read_text())
        if conf["cache"].get("kv_bits", 16) != 16:  # quantized storage: its own table (README, --kv_bits)
            continue
        m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else None
        most = max(most, len(rows))
        if m is None:  # unfinished: no score yet
            cells[cell_key(conf)] = (None, None, len(rows), None, "")
            continue
        v = E.compare_with_full(d, m, rows, resamples)
        key, kind = cell_key(conf), E.paired_kind(m)
        cells[key] = (m["score"], m["score_stderr"], m["n"], v, kind)
        if kind == "kl":  # fidelity: the KL (the full cache: 0), its interval's half-width as the error bar
            y, err = (v["mean"], (v["ci95"][1] - v["ci95"][0]) / 2) if v and "mean" in v else (0.0, 0.0)
            ylabel = "KL(full || compressed), nats per token ± half its 95% interval"
        else:
            y, err = m["score"], m["score_stderr"] or 0.0
            ylabel = f"{m['metric']} ± standard error"
        points.setdefault((key[0], key[2]), []).append((E.kib_per_token(m), y, err))
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
                    unit, f = ("%", 1) if kind == "ppl" else ("", 0)  # perplexity changes: tenths of a percent
                    text += f"<br>{E.shown(kind, v['mean']):+.{f}f}{unit} [{lo:+.{f}f}, {hi:+.{f}f}]"
            out.append(text)
        print(f"| {s} | " + " | ".join(out) + " |")
    if plot_path:
        for p in PROTOCOLS:  # the full cache in every panel: the point each line is measured against
            points[("full", p)] = points.get(("full", p)) or points.get(("full", "context"), [])
        plot(points, plot_path, folder.name, ylabel)


def first_rows(rows, n):
    """The first n rows in the task's sample order (ids "a-b" by b, then a; others as written)."""
    def order(r):
        a, _, b = str(r["id"]).rpartition("-")
        return (int(b), int(a)) if a.isdigit() and b.isdigit() else (math.inf, 0)
    return sorted(rows, key=order)[:n] if n else rows


def kv_bits_table(folder: Path, first: int | None, resamples: int, plot_path: Path | None):
    """Issue 12's grid: (strategy, budget) rows x bit widths, each cell against the 16-bit full cache."""
    cells, bits_seen = {}, set()
    for d in sorted(p.parent for p in folder.glob("*/config.json")):
        conf = json.loads((d / "config.json").read_text())
        s, budget, protocol = cell_key(conf)
        bits = conf["cache"].get("kv_bits", 16)
        rows = first_rows(E.finished_rows(d), first)
        if protocol != "context" or s not in ("full", "snapkv", "h2o") or budget not in ("1", "0.5", "0.25") \
                or len(rows) < (first or 1):
            continue
        # from the rows, so that an unfinished run's first samples count: perplexity as exp(mean NLL) with
        # its delta-method error; fidelity's KL is paired within each row
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        m = {"strategy": s, "kv_bits": bits, "n": len(rows), "higher_is_better": False,
             "cache_bytes": mean("cache_bytes"), "n_prompt": mean("n_prompt")}
        if folder.name.startswith("ppl"):
            m |= {"metric": "perplexity", "score": math.exp(mean("score"))}
            m["score_stderr"] = T.stderr([r["score"] for r in rows], m["score"])
        else:
            m |= {"metric": "kl", "kl": mean("kl")}
        cells[(s, budget), bits] = (m, E.compare_with_full(d, m, rows, resamples))
        bits_seen.add(bits)
    widths = sorted(bits_seen, reverse=True)
    print("| configuration | " + " | ".join(f"{b}-bit" for b in widths) + " |")
    print("|---|" + "---:|" * len(widths))
    points = {}
    for key in sorted({k for k, _ in cells}, key=lambda k: (k[0] != "full", -float(k[1]), k[0])):
        out = []
        for b in widths:
            if (key, b) not in cells:
                out.append("")
                continue
            m, v = cells[key, b]
            kind, kib = E.paired_kind(m), E.kib_per_token(m)
            if kind == "kl":
                y = v["mean"] if v and "mean" in v else 0.0
                lo, hi = v["ci95"] if v and "mean" in v else (0.0, 0.0)
                text = f"KL {y:.3f} [{lo:.3f}, {hi:.3f}]"
                err = (hi - lo) / 2
            else:  # plotted: the paired change from the 16-bit full cache (the books' spread cancels)
                text = f"{m['score']:.2f} ± {m['score_stderr'] or 0.0:.2f}"
                y, err = 0.0, 0.0
                if v and "mean" in v:
                    lo, hi = (E.shown(kind, x) for x in v["ci95"])
                    y, err = E.shown(kind, v["mean"]), (hi - lo) / 2
                    text += f"<br>{y:+.1f}% [{lo:+.1f}, {hi:+.1f}]"
            out.append(f"{text}<br>{kib:.1f} KiB")
            points.setdefault(key, []).append((kib, y, err, b))
        name = "full" if key[0] == "full" else f"{key[0]} {float(key[1]):.0%}"
        print(f"| {name} | " + " | ".join(out) + " |")
    n = {m["n"] for m, _ in cells.values()}
    print(f"\nn = {', '.join(map(str, sorted(n)))} per cell" + (f" (each run's first {first})" if first else ""))
    if plot_path:
        kind = E.paired_kind(next(iter(cells.values()))[0])
        ylabel = ("KL from the 16-bit full cache, nats" if kind == "kl" else
                  "perplexity vs the 16-bit full cache, %") + " (± half the 95% CI)"
        kv_bits_plot(points, plot_path, folder.name, ylabel)


def kv_bits_plot(points: dict, path: Path, title: str, ylabel: str):
    """Score against the allocated KV cache in KiB per prompt token: a line per (strategy, budget) through
    its bit widths, each point labelled with its bits, so budget and bits meet on one axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (key, pts) in enumerate(sorted(points.items(), key=lambda kv: (kv[0][0] != "full", -float(kv[0][1])))):
        x, y, err, bits = zip(*sorted(pts))
        label = "full" if key[0] == "full" else f"{key[0]} {float(key[1]):.0%}"
        ax.errorbar(x, y, yerr=err, label=label, marker="*" if key[0] == "full" else "os^vD"[i % 5],
                    markersize=11 if key[0] == "full" else 6, capsize=2, alpha=0.85)
        for xi, yi, b in zip(x, y, bits):
            ax.annotate(str(b), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("allocated KV cache, KiB per prompt token (budget and bits)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}: KIVI codes (points labelled with their bits)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    args = sys.argv[1:]
    where = args.index("--plot") + 1 if "--plot" in args else None
    plot_path = Path(args[where]) if where else None
    if "--kv_bits" in args:
        first = int(args[args.index("--first") + 1]) if "--first" in args else None
        kv_bits_table(Path(args[0]), first, 10_000, plot_path)
    else:
        main(Path(args[0]), plot_path=plot_path)
