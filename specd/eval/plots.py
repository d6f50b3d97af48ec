"""Charts of a summary: per-category acceptance and speedup, and a gamma ablation (several gammas)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_plotting() -> Any:
    """matplotlib, or a RuntimeError saying how to install it (checked before the suite runs)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'specd[bench]'") from exc
    return matplotlib


def _pyplot() -> Any:
    matplotlib = check_plotting()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_label(summary: dict[str, Any]) -> str:
    """The speedup chart's axis: per-question latency, at the run's concurrency (see summary)."""
    concurrency = (summary.get("run") or {}).get("concurrency") or 1
    return f"per-question latency speedup ({concurrency} at once)"


def _per_category(plt: Any, summary: dict[str, Any], key: str, label: str, path: Path,
                  line: float | None = None, throughput: dict[str, float] | None = None) -> Path:
    """One bar per category and gamma; ``throughput``: the suite's throughput speedup per mode,
    drawn as a line beside the latency bars so that the two read together."""
    categories = list(summary["categories"])
    gammas = list((summary["overall"].get("speculative") or {}).keys())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(categories) + 2), 4.2))
    width = 0.8 / max(1, len(gammas))
    for i, gamma in enumerate(gammas):
        values = [summary["categories"][c].get("speculative", {}).get(gamma, {}).get(key, 0.0)
                  for c in categories]
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=f"gamma {gamma}")
    if line is not None:
        ax.axhline(line, color="grey", linewidth=0.8, linestyle="--")
    for name, value in (throughput or {}).items():
        ax.axhline(value, linewidth=1.2, linestyle=":", color="tab:red",
                   label=f"suite throughput {name}: {value:.2f}x")
    ax.set_xticks([x + width * (len(gammas) - 1) / 2 for x in range(len(categories))])
    ax.set_xticklabels(categories, rotation=35, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"{summary['suite']}: {label} per category")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ablation(plt: Any, summary: dict[str, Any], path: Path) -> Path:
    spec = summary["overall"]["speculative"]
    gammas = sorted(spec, key=int)
    xs = [int(g) for g in gammas]
    run = summary.get("run") or {}  # after --resume: all the runs' phases together
    throughput = run.get("throughput_speedup_all_runs") or run.get("throughput_speedup") or {}
    panels = [("acceptance_rate", "acceptance rate"), ("mean_accepted_length", "tokens per round"),
              ("speedup", "per-question latency speedup")]
    values = {key: [spec[g].get(key, 0.0) for g in gammas] for key, _ in panels}
    if all(f"speculative@{g}" in throughput for g in gammas):  # the run's suite throughput
        panels.append(("throughput", "suite throughput speedup"))
        values["throughput"] = [throughput[f"speculative@{g}"] for g in gammas]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(xs, values[key], marker="o")
        ax.set_xlabel("gamma (draft tokens per round)")
        ax.set_title(label)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    fig.suptitle(f"{summary['suite']}: gamma ablation ({summary['counts']['succeeded']} questions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_charts(summary: dict[str, Any], folder: Path) -> list[Path]:
    """PNG files written into ``folder``; nothing without speculative results."""
    if not summary["overall"].get("speculative"):
        return []
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        _per_category(plt, summary, "acceptance_rate", "acceptance rate", folder / "acceptance.png"),
        _per_category(plt, summary, "speedup", latency_label(summary), folder / "speedup.png", 1.0,
                      throughput=(summary.get("run") or {}).get("throughput_speedup") or {}),
    ]
    if len(summary["overall"]["speculative"]) > 1:
        paths.append(_ablation(plt, summary, folder / "gamma_ablation.png"))
    return paths
