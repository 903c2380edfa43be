"""Accuracy against FLOPs, one line per rule: the plot `ablate` draws of its results table."""
from __future__ import annotations

SCORE_COLORS = {"attention_received": "tab:blue", "cls_attention": "tab:orange", "hidden_norm": "tab:green",
                "attention_entropy": "tab:purple", "random": "0.45"}
AGGREGATE_STYLES = {"drop": ("x", ":"), "mean": ("s", "-."), "weighted": ("o", "-"), "clusters": ("^", "--"),
                    "similarity": ("D", (0, (5, 1)))}


def plot(rows, path, padded=False) -> bool:
    """Accuracy vs FLOPs ratio, one line per rule (colour = score, marker and dashes = aggregation); the full
    model a star, the random-score rules grey (the floor), schedule files black-edged diamonds. False when
    matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x_of = "flops_ratio_padded" if padded else "flops_ratio"
    fig, ax = plt.subplots(figsize=(11, 6))
    lines = {}
    for r in rows:
        lines.setdefault(r["label"], []).append((float(r[x_of]), float(r["accuracy"]), r))
    for label, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        r = pts[0][2]
        if label == "full model":
            ax.scatter(xs, ys, marker="*", s=300, color="black", zorder=5, label="full model")
            ax.axhline(ys[0], color="black", lw=0.6, ls=":")
            if padded:                                               # the baseline itself: all of padding's saving
                ax.scatter([1.0], ys, marker="*", s=300, facecolor="none", edgecolor="black", zorder=5,
                           label="full model, padded (= 1)")
                ax.annotate("padding alone", xy=(xs[0], ys[0]), xytext=(0.95, ys[0] + 0.01), va="bottom", ha="right",
                            fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.8}, xycoords="data",
                            textcoords="data")
        elif label.startswith("schedule"):
            ax.scatter(xs, ys, marker="D", s=45, zorder=4, edgecolor="black", label=label)
        else:
            marker, ls = AGGREGATE_STYLES.get(r["aggregate"], ("o", "-"))
            floor = r["score"] == "random"
            ax.plot(xs, ys, marker=marker, ms=4, lw=1.3, ls=ls, color=SCORE_COLORS.get(r["score"]),
                    alpha=0.8 if floor else 1.0, label=label + (" (floor)" if floor else ""))
    ax.set_xlabel("FLOPs / full model " + ("padded to a fixed length (the paper's baseline)" if padded
                                           else "on the real tokens (unpadded)"))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

