"""Showing a hardware profile: rich tables, and a latency plot in the terminal (plotext) or as a PNG.

Design choices:
- Everything renders from a `HardwareProfile` alone, so measured, estimated and loaded profiles show
  the same way.
- The plot answers one question at a glance: up to how many tokens does the CPU beat loading an
  expert? It draws latency against tokens (log-log) for the CPU, for load + accelerator and for a
  resident expert on the accelerator, the load time as a horizontal line and the crossover as a
  vertical one. A CPU-only profile plots the CPU alone and says why.
- matplotlib is optional (`pip install matplotlib`); `png_available()` lets the caller say so.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from hybrimoe.config import HardwareProfile, LatencyCurve
from hybrimoe.files import write_atomically
from hybrimoe.profile.fit import crossover_tokens, curve_problems


@dataclass(frozen=True)
class PlotSeries:
    n_tokens: tuple[int, ...]
    cpu_ms: tuple[float, ...]
    gpu_ms: tuple[float, ...] | None  # a resident expert on the accelerator
    load_ms: float | None  # one expert, pinned host -> accelerator
    crossover: int | None  # fewest tokens at which load + accelerator beats the CPU

    @property
    def load_then_gpu_ms(self) -> tuple[float, ...] | None:
        if self.gpu_ms is None or self.load_ms is None:
            return None
        return tuple(self.load_ms + ms for ms in self.gpu_ms)


def _counts(*curves: LatencyCurve | None) -> tuple[int, ...]:
    counts = sorted({p.n_tokens for c in curves if c is not None for p in c.points})
    return tuple(counts) or tuple(2**i for i in range(12))


def plot_series(profile: HardwareProfile) -> PlotSeries:
    counts = _counts(profile.cpu_expert, profile.gpu_expert)
    gpu, transfer = profile.gpu_expert, profile.transfer
    return PlotSeries(
        n_tokens=counts,
        cpu_ms=tuple(profile.cpu_expert.ms(n) for n in counts),
        gpu_ms=None if gpu is None else tuple(gpu.ms(n) for n in counts),
        load_ms=None if transfer is None else transfer.expert_load_ms,
        crossover=None if gpu is None else crossover_tokens(profile.cpu_expert, gpu, transfer.expert_load_ms),
    )


def _title(profile: HardwareProfile) -> str:
    return f"{profile.name}: one expert ({profile.expert_shape.describe()})"


def crossover_line(profile: HardwareProfile) -> str:
    """One sentence: when the CPU should run a non-resident expert instead of loading it."""
    series = plot_series(profile)
    if series.gpu_ms is None:
        return "No accelerator in this profile: every expert runs on the CPU."
    if series.crossover is None:
        return "The CPU beats loading an expert at every token count up to 4096."
    if series.crossover == 1:
        return f"Loading an expert ({series.load_ms:.3f} ms) beats the CPU even at 1 token."
    return (
        f"The CPU beats loading an expert ({series.load_ms:.3f} ms) up to {series.crossover - 1} token(s); "
        f"from {series.crossover} tokens on, load it and run it on the accelerator."
    )


def _ms(curve: LatencyCurve | None, n_tokens: int) -> str:
    if curve is None:
        return "-"
    for p in curve.points:
        if p.n_tokens == n_tokens:
            return f"{p.ms:.3f} ± {p.spread_ms / 2:.3f}" if p.spread_ms else f"{p.ms:.3f}"
    return "-"


def curves_table(profile: HardwareProfile) -> Table:
    """Measured points per token count (median ± half the spread)."""
    table = Table(title="Latency against tokens (ms, median ± half the spread)", title_justify="left")
    table.add_column("tokens", justify="right")
    table.add_column("CPU expert", justify="right")
    if profile.gpu_expert is not None:
        table.add_column("accelerator expert", justify="right")
        table.add_column("load + accelerator", justify="right")
        table.add_column("non-resident: faster", justify="left")
    table.add_column("dense part of a layer", justify="right")
    series = plot_series(profile)
    for n_tokens in _counts(profile.cpu_expert, profile.gpu_expert, profile.dense_layer):
        row = [str(n_tokens), _ms(profile.cpu_expert, n_tokens)]
        if profile.gpu_expert is not None:
            loaded = series.load_ms + profile.gpu_expert.ms(n_tokens)
            row += [
                _ms(profile.gpu_expert, n_tokens),
                f"{loaded:.3f}",
                "CPU" if profile.cpu_expert.ms(n_tokens) <= loaded else "load",
            ]
        row.append(_ms(profile.dense_layer, n_tokens))
        table.add_row(*row)
    return table


def _fit(curve: LatencyCurve) -> str:
    fit = curve.fit
    if fit is None:
        return "points only"
    quality = ""
    if fit.r2 is not None and fit.max_rel_error is not None:
        quality = f"  (R² {fit.r2:.3f}, max error {fit.max_rel_error:.0%})"
    return f"{fit.intercept_ms:.4f} + {fit.per_token_ms:.5f} × tokens ms{quality}"


def summary_table(profile: HardwareProfile) -> Table:
    """The profile's figures, one per row."""
    shape = profile.expert_shape
    table = Table(title=_title(profile), title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value")
    m = profile.machine
    table.add_row("machine", f"{m.cpu}, {m.cores} cores, {m.threads} threads" + (f"; {m.gpu}" if m.gpu else ""))
    if profile.estimated:
        table.add_row("estimated", "yes: datasheet roofline, not measured")
    table.add_row("expert", f"{shape.describe()}, {shape.expert_bytes / 1e6:.2f} MB")
    cpu_1 = profile.cpu_expert.ms(1)
    weight_gbps = shape.expert_bytes / cpu_1 / 1e6
    bandwidth = f"{weight_gbps:.2f} GB/s of weights"
    if profile.host_memory_gbps:
        bandwidth += f", {weight_gbps / profile.host_memory_gbps:.0%} of host memory bandwidth"
    table.add_row("CPU expert, 1 token", f"{cpu_1:.3f} ms ({bandwidth})")
    table.add_row("CPU expert fit", _fit(profile.cpu_expert))
    table.add_row("CPU first expert of a layer", f"+{profile.cpu_first_expert_extra_ms:.3f} ms")
    if profile.host_memory_gbps:
        table.add_row("host memory read bandwidth", f"{profile.host_memory_gbps:.2f} GB/s")
    if profile.gpu_expert is not None:
        table.add_row("accelerator expert, 1 token", f"{profile.gpu_expert.ms(1):.3f} ms")
        table.add_row("accelerator expert fit", _fit(profile.gpu_expert))
    t = profile.transfer
    if t is not None:
        table.add_row("expert load (pinned)", f"{t.expert_load_ms:.3f} ms")
        peak = f"{t.h2d_pinned_gbps:.2f} GB/s large transfers"
        if t.h2d_pinned_expert_gbps:
            share = t.h2d_pinned_expert_gbps / t.h2d_pinned_gbps
            peak = f"{t.h2d_pinned_expert_gbps:.2f} GB/s one expert, {peak} ({share:.0%})"
        table.add_row("host -> accelerator, pinned", peak)
        if t.h2d_pageable_gbps:
            table.add_row("host -> accelerator, pageable", f"{t.h2d_pageable_gbps:.2f} GB/s")
        if t.d2h_gbps:
            table.add_row("accelerator -> host", f"{t.d2h_gbps:.2f} GB/s")
    table.add_row("dense part of a layer, 1 token", f"{profile.dense_layer.ms(1):.3f} ms")
    table.add_row("dense part fit", _fit(profile.dense_layer))
    table.add_row("per-layer overhead", f"{profile.layer_overhead_ms:.3f} ms")
    i = profile.interference
    table.add_row("interference", f"CPU experts ×{i.cpu_slowdown:.2f}, copies ×{i.copy_slowdown:.2f} when both run")
    table.add_row("crossover", crossover_line(profile))
    for what, problem in curve_problems(profile):
        table.add_row("[bold yellow]warning[/]", f"{what}: {problem}; other processes probably held the cores: "
                      "profile again on an idle machine, or with fewer --threads")
    return table


def terminal_plot(profile: HardwareProfile, width: int = 80, height: int = 20, color: bool = True) -> Text:
    """Latency against tokens, log-log, drawn with plotext; the legend is a line under the plot."""
    import plotext

    series = plot_series(profile)
    counts = list(series.n_tokens)
    lines = [("CPU", "red", counts, list(series.cpu_ms))]
    if series.gpu_ms is not None:
        lines += [
            ("load + accelerator", "blue", counts, list(series.load_then_gpu_ms)),
            ("accelerator, resident", "green", counts, list(series.gpu_ms)),
            (f"load {series.load_ms:.3f} ms", "bright_black", [counts[0], counts[-1]], [series.load_ms] * 2),
        ]
        if series.crossover is not None:
            low = min(*series.cpu_ms, *series.gpu_ms)
            high = max(*series.cpu_ms, *series.load_then_gpu_ms)
            lines.append((f"crossover {series.crossover} tokens", "magenta", [series.crossover] * 2, [low, high]))

    figure = plotext.figure
    figure.clear()
    figure.plot_size(width, height)
    figure.theme("simple")
    figure.ruler("x").scale("log")
    figure.ruler("y").scale("log")
    for _, colour, xs, ys in lines:
        figure.draw(figure.signal(xs, ys, marker=plotext.marker("hd", _PLOTEXT_COLOURS[colour])).lines())
    figure.legend(active=False)
    figure.title(_title(profile) if series.gpu_ms is not None else f"{_title(profile)}: CPU only")
    figure.label("tokens", "x")
    figure.label("ms", "y")
    text = Text.from_ansi(figure.build().string(colorless=not color))
    figure.clear()
    text.append("\n")
    for label, colour, *_ in lines:
        text.append("━━ ", style=colour if color else None)
        text.append(f"{label}   ")
    return text


_PLOTEXT_COLOURS = {"red": "red", "blue": "blue", "green": "green", "bright_black": "gray", "magenta": "magenta"}


def png_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def save_png(profile: HardwareProfile, path: str | Path) -> Path:
    """The same plot as an image (needs matplotlib: check `png_available()` first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(profile)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(series.n_tokens, series.cpu_ms, marker="o", label="CPU")
    if series.gpu_ms is not None:
        ax.plot(series.n_tokens, series.load_then_gpu_ms, marker="s", label="load + accelerator")
        ax.plot(series.n_tokens, series.gpu_ms, marker="^", label="accelerator, resident")
        ax.axhline(series.load_ms, color="gray", linestyle="--", label=f"load {series.load_ms:.3f} ms")
        if series.crossover is not None:
            ax.axvline(series.crossover, color="red", linestyle=":", label=f"crossover: {series.crossover} tokens")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens routed to the expert")
    ax.set_ylabel("ms")
    ax.set_title(_title(profile) if series.gpu_ms is not None else f"{_title(profile)}: CPU only")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    write_atomically(path, lambda fh: fig.savefig(fh, format="png"))  # missing folders made, as for --out
    plt.close(fig)
    return path
