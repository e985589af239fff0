"""The breakdown's charts: segments add up to the device total exactly; the terminal bar's length follows
the scale to within one cell per segment (rounding); the plot writes real PNG/SVG files."""

from __future__ import annotations

import pytest

from memfit import Job, estimate
from memfit.charts import AMBER_FRACTION, bar_segments, headroom_level, plot_breakdown, stacked_bar
from memfit.cli import main
from memfit.commands.estimate import estimate_with_verdict
from memfit.errors import JobError

GiB = 1 << 30


@pytest.mark.parametrize("job", [Job(model="gpt2", batch_size=4), Job(model="llama-3.2-1b", method="lora"),
                                 Job(model="qwen2.5-0.5b", task="infer", new_tokens=32)])
def test_segments_add_up_to_device_total(job):
    bd = estimate(job)
    segs = bar_segments(bd)
    assert sum(n for _, n in segs) == bd.device_total_bytes
    assert [n for _, n in segs[:len(bd.components)] if n] == sorted(
        [v for v in bd.components.values() if v], reverse=True)


def test_headroom_levels():
    job = Job(model="gpt2", batch_size=4)
    total = estimate(job).device_total_bytes
    assert headroom_level(estimate(job)) is None
    assert headroom_level(estimate_with_verdict(job, total * 2)[0]) == "green"
    assert headroom_level(estimate_with_verdict(job, int(total / (1 - AMBER_FRACTION / 2)))[0]) == "amber"
    # a card just under the uncapped device total can still fit (under its limit the allocator frees cached
    # blocks and retries); one that cannot hold the tensors themselves cannot
    assert headroom_level(estimate_with_verdict(job, estimate(job).peak_allocated_bytes)[0]) == "red"


def test_terminal_bar_length_and_card_mark():
    bd, _ = estimate_with_verdict(Job(model="gpt2", batch_size=4), 2 * estimate(Job(model="gpt2", batch_size=4)).device_total_bytes)
    first = stacked_bar(bd, width=40).plain.splitlines()[0]
    assert first.count("█") == 20  # device total is half the card: 20 of 40 cells (cumulative rounding: exact)
    assert first.index("|") == 40 and "card" in first


def test_plot_png_svg_and_bad_suffix(tmp_path):
    bd, _ = estimate_with_verdict(Job(model="gpt2"), 24 * GiB)
    png = plot_breakdown(bd, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_breakdown(bd, tmp_path / "b.svg")
    assert "<svg" in svg.read_text()[:2000]
    with pytest.raises(JobError):
        plot_breakdown(bd, tmp_path / "b.jpg")


def test_cli_prints_bar_and_plots(tmp_path, capsys):
    out = tmp_path / "e.png"
    assert main(["estimate", "gpt2", "--gpu-memory", "24GiB", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "card 24.00 GiB" in text and "█" in text
    assert out.stat().st_size > 5000
    assert main(["estimate", "gpt2", "--plot", str(tmp_path / "x.gif")]) == 2
