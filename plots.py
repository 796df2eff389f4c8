"""Figures: a validation clip's mel spectrograms, `--eval`'s summary.png and `--compare`'s per-row differences.

Drawn on matplotlib's Agg canvas without pyplot, so no display is needed and
no backend is chosen for whoever imports this; PNG files are written whole
through `files.atomic_file`, and TensorBoard gets the same figure as an RGB
array (`render`).

- `mel_figure`: generated, real target and reference stacked on one time
  axis (grey where a shorter clip has ended), low frequencies at the bottom,
  one dB colour scale for the three (0 dB = the loudest bin of them all, so
  a quiet clip looks quiet beside a loud one), each panel titled with what it
  is, its text and its SIM and WER/CER;
- `summary_figure`: one histogram per per-row metric (`metrics.ROW_METRICS`
  with a value), the real targets' overlaid where the rows have them;
- `differences_figure`: per metric, each matched row's B - A, sorted, with
  the mean and its paired 95% interval.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import files
import metrics

N_MELS, HOP_SECONDS, DYNAMIC_RANGE_DB = 80, 0.01, 80.0
MEL_WIDTH_INCHES, PANEL_HEIGHT_INCHES, DPI = 10.0, 2.3, 100
TITLE_CHARACTERS = 90


def render(figure: Figure) -> np.ndarray:
    """The figure as an (height, width, 3) uint8 RGB array, for TensorBoard's `add_image(..., dataformats="HWC")`."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_png(figure: Figure, path: Path) -> Path:
    """The figure as a PNG at `path`, whole or absent."""
    FigureCanvasAgg(figure)  # drawn by Agg whatever backend matplotlib would choose
    with files.atomic_file(Path(path)) as handle:
        figure.savefig(handle, format="png")
    return Path(path)


# --------------------------------------------------------------------------
# Mel spectrograms of a validation clip
# --------------------------------------------------------------------------


def mel_power_db(waveform: np.ndarray, rate: int) -> np.ndarray:
    """(N_MELS, frames) mel power in dB (librosa's mel filters, power 1 = 0 dB), 10 ms hops."""
    import librosa

    hop = max(1, round(HOP_SECONDS * rate))
    power = librosa.feature.melspectrogram(y=np.asarray(waveform, dtype=np.float32), sr=rate, n_mels=N_MELS, hop_length=hop)
    return librosa.power_to_db(power, ref=1.0, top_db=None)


def _shorten(text: str) -> str:
    return textwrap.shorten(" ".join(text.split()), TITLE_CHARACTERS, placeholder="...")


def _scores(sim, error_rate, kind: str) -> str:
    return f"SIM {metrics.fmt(sim)}, {kind.upper()} {metrics.fmt(error_rate)}"


def clip_panels(record: dict, ref_text: str, generated: np.ndarray, target: np.ndarray | None,
                reference: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The (title, waveform) panels of one scored row (`metrics.row_record`): generated, real target (where the row
    has one), reference."""
    kind = record["metric"]
    panels = [(f"generated: {_scores(record['sim'], record['error_rate'], kind)}: \u201c{_shorten(record['text'])}\u201d", generated)]
    if target is not None:
        panels.append((f"real target: {_scores(record['target_sim'], record['target_error_rate'], kind)}", target))
    panels.append((f"reference: \u201c{_shorten(ref_text)}\u201d", reference))
    return panels


def mel_figure(panels: list[tuple[str, np.ndarray]], rate: int, heading: str = "") -> Figure:
    """Mel spectrograms stacked on one time axis (a shorter clip ends early), low frequencies at the bottom, the
    frequency axis in Hz, one colour scale in dB for all panels (0 = their loudest bin)."""
    mels = [mel_power_db(waveform, rate) for _, waveform in panels]
    loudest = max(float(mel.max()) for mel in mels)
    mels = [mel - loudest for mel in mels]
    figure = Figure(figsize=(MEL_WIDTH_INCHES, PANEL_HEIGHT_INCHES * len(panels) + 0.5), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    longest = max(len(waveform) for _, waveform in panels) / rate
    hertz = _hertz_ticks(rate)
    for ax, (title, waveform), mel in zip(axes, panels, mels):
        image = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                          vmin=-DYNAMIC_RANGE_DB, vmax=0, extent=(0, len(waveform) / rate, 0, N_MELS))
        ax.set_facecolor("0.85")  # after the clip's end; silence is black
        ax.set_xlim(0, longest)
        ax.set_yticks(list(hertz), [f"{value / 1000:g}k" if value >= 1000 else f"{value:g}" for value in hertz.values()])
        ax.set_ylabel("Hz (mel scale)")
        ax.set_title(title, loc="left", fontsize=9)
    axes[-1].set_xlabel("seconds")
    figure.colorbar(image, ax=list(axes), label="dB (0 = the loudest bin of all panels)", fraction=0.03, pad=0.01)
    if heading:
        figure.suptitle(heading, fontsize=10)
    return figure


def _hertz_ticks(rate: int) -> dict[float, float]:
    """Mel-bin positions of round frequencies: {position: Hz}."""
    import librosa

    centres = librosa.mel_frequencies(N_MELS + 2, fmax=rate / 2)[1:-1]
    wanted = [value for value in (0, 500, 1000, 2000, 4000, 8000, 16000) if value < rate / 2]
    return {float(np.interp(value, centres, np.arange(N_MELS) + 0.5)): float(value) for value in wanted}


# --------------------------------------------------------------------------
# --eval's summary.png and --compare's differences
# --------------------------------------------------------------------------


def _grid(count: int, heading: str, panel_inches: tuple[float, float] = (4.2, 3.0)) -> tuple[Figure, list]:
    columns = min(3, max(1, count))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(panel_inches[0] * columns, panel_inches[1] * rows + 0.4), dpi=DPI, layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for unused in axes[count:]:
        unused.set_visible(False)
    figure.suptitle(heading, fontsize=10)
    return figure, axes[:count]


def _values(records: list[dict], column: str) -> np.ndarray:
    """The column's values, `n/a` left out; `stopped` counts as 0 or 1."""
    return metrics.present_values(record.get(column) for record in records)


def summary_figure(records: list[dict], heading: str) -> Figure:
    """One histogram per per-row metric of the rows (`metrics.ROW_METRICS` present in them), the real targets'
    values overlaid where the rows have a `target_` column; a metric no row has a value for says so."""
    columns = [column for column in metrics.ROW_METRICS if records and column in records[0]]
    figure, axes = _grid(len(columns), heading)
    for ax, column in zip(axes, columns):
        series = [("generated", _values(records, column), "tab:blue")]
        if f"target_{column}" in records[0]:
            series.append(("real targets", _values(records, f"target_{column}"), "tab:orange"))
        series = [entry for entry in series if entry[1].size]
        better = metrics.BETTER.get(column)
        ax.set_title(f"{column}" + (f" (better: {better})" if better else ""), fontsize=10)
        ax.set_ylabel("rows")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if better == "near 1":
            ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="ideal: 1")
        if not series:
            ax.text(0.5, 0.5, "n/a in every row", ha="center", va="center", transform=ax.transAxes)
            continue
        edges = np.histogram_bin_edges(np.concatenate([values for _, values, _ in series]), bins=min(20, max(5, len(records))))
        for label, values, colour in series:
            ax.hist(values, bins=edges, alpha=0.55, color=colour,
                    label=f"{label}: n={values.size}, mean {values.mean():.3f}")
            ax.axvline(values.mean(), color=colour, linewidth=1.5)
        ax.legend(fontsize=7, loc="best")
    return figure


def differences_figure(comparison: dict, heading: str) -> Figure:
    """Per compared metric, each matched row's B - A sorted (green: B better, red: worse, grey: no direction or
    tied), a line at 0, and the mean difference with its paired 95% interval."""
    compared = [(name, stats) for name, stats in comparison["metrics"].items() if stats["n"]]
    figure, axes = _grid(len(compared), heading)
    for ax, (name, stats) in zip(axes, compared):
        differences = np.array(sorted(comparison["per_row"][name].values()), dtype=np.float64)
        sign = {"higher": 1, "lower": -1, "near 1": -1}.get(stats["better"], 0)
        colours = ["tab:green" if sign * d > 0 else "tab:red" if sign * d < 0 else "tab:gray" for d in differences]
        ax.bar(np.arange(differences.size), differences, color=colours, width=0.8)
        ax.axhline(0, color="black", linewidth=0.8)
        low, high = stats["ci95"]
        ax.axhspan(low, high, color="tab:blue", alpha=0.2, label=f"mean {stats['mean']:+.3f}, 95% CI [{low:+.3f}, {high:+.3f}]")
        ax.axhline(stats["mean"], color="tab:blue", linewidth=1.2)
        label = f"|{name} - 1|" if stats["better"] == "near 1" else name
        ax.set_title(f"{label}: B - A, {stats['verdict']}", fontsize=10)
        ax.set_xlabel("matched rows, sorted")
        ax.legend(fontsize=7, loc="best")
        if not differences.any():  # autoscaling a flat line gives a meaningless 1e-17 axis
            ax.set_ylim(-1, 1)
            ax.text(0.5, 0.3, "no matched row changed", ha="center", transform=ax.transAxes)
    return figure
