"""Figures (plots.py): the mel panel of a validation clip and --eval's summary.png, at their size, with their
panels labelled, drawn without a display."""

from __future__ import annotations

import numpy as np

import metrics
import plots
from conftest import scored_records

RATE = 24000


def test_mel_figure_stacks_three_labelled_panels_on_one_time_axis_low_frequencies_at_the_bottom(demo_clips):
    import data

    target, reference = (data.load_audio(demo_clips[name]["audio"], RATE) for name in ("en_female_1", "en_female_0"))
    low_hum = 0.5 * np.sin(2 * np.pi * 150 * np.arange(RATE // 2) / RATE).astype(np.float32)  # 0.5 s at 150 Hz
    record = metrics.row_record("en_female_1", "en", demo_clips["en_female_1"]["text"],
                                metrics.ClipScores(0.5, 0.42, 0.25, "words", 0.0, 0.0), True,
                                metrics.ClipScores(1.0, 0.8, 0.0, "words", 0.0, 0.0))
    figure = plots.mel_figure(plots.clip_panels(record, demo_clips["en_female_0"]["text"], low_hum, target, reference), RATE, "row")
    image = plots.render(figure)
    assert image.shape == (740, 1000, 3) and image.dtype == np.uint8  # 10 x (3 x 2.3 + 0.5) inches at 100 dpi
    panels = [ax for ax in figure.axes if ax.images and ax.get_label() != "<colorbar>"]
    titles = [ax.get_title(loc="left") for ax in panels]
    assert len(panels) == 3 and titles[0].startswith("generated: SIM 0.420, WER 0.250: \u201c")
    assert titles[1] == "real target: SIM 0.800, WER 0.000" and titles[2].startswith("reference: \u201c")
    assert [ax.get_ylabel() for ax in panels] == ["Hz (mel scale)"] * 3 and panels[-1].get_xlabel() == "seconds"
    assert all(ax.get_xlim() == (0.0, 1.0) for ax in panels), "one time axis: the longest clip's"
    assert [ax.images[0].get_extent()[1] for ax in panels] == [0.5, 1.0, 1.0]
    hum = panels[0].images[0].get_array()
    assert panels[0].images[0].origin == "lower" and np.argmax(hum.mean(axis=1)) < 10, "150 Hz is near the bottom"
    assert hum.max() <= 0 and any("dB" in ax.get_ylabel() for ax in figure.axes if ax.get_label() == "<colorbar>")


def test_summary_figure_has_a_panel_per_row_metric_with_the_targets_overlaid():
    records = scored_records(12)
    for record in records:
        record["lead_silence"] = record["target_lead_silence"] = None  # a metric with no value in any row says so
    figure = plots.summary_figure(records, "list: 12 rows")
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title().split(" ")[0] for ax in panels] == list(metrics.ROW_METRICS)
    legends = {ax.get_title().split(" ")[0]: [text.get_text() for text in ax.get_legend().get_texts()]
               for ax in panels if ax.get_legend()}
    assert legends["sim"][0].startswith("generated: n=12, mean") and legends["sim"][1].startswith("real targets: n=12")
    assert len(legends["stopped"]) == 1, "no target_stopped column"
    assert panels[metrics.ROW_METRICS.index("lead_silence")].texts[0].get_text() == "n/a in every row"
    rows = -(-len(metrics.ROW_METRICS) // 3)  # three panels a row, 300 pixels each, 40 for the heading
    assert plots.render(figure).shape == (40 + 300 * rows, 1260, 3)
