"""The README's strategy tables from an eval.py results folder: one row per strategy, one column per
budget and protocol, each cell the score ± its standard error and, below it, the paired difference from
the full cache on the same samples with its bootstrap 95% interval (eval.py's own statistics: points of
accuracy; perplexity in %; for fidelity the KL itself, in nats).

    python scripts/readme_tables.py results/tables/SmolLM2-135M-Instruct/rulerniah_single-2048 \
        --plot docs/tables-rulerniah_single-2048.png      # and the Pareto plot: a panel per protocol

Cells with fewer samples than the most complete one are marked with their n, unfinished runs with the
samples they have; missing cells are blank. Quantized runs (--kv_bits below 16) are left out."""
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


if __name__ == "__main__":
    args = sys.argv[1:]
    where = args.index("--plot") + 1 if "--plot" in args else None
    main(Path(args[0]), plot_path=Path(args[where]) if where else None)
