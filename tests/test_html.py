"""onnxopt.html: inline-SVG charts and page blocks, checked as XML and in a real browser."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from headless_browser import ink, render

from onnxopt import html

SVG = "{http://www.w3.org/2000/svg}"


def _svg(fragment: str) -> ET.Element:
    start, end = fragment.index("<svg"), fragment.index("</svg>") + len("</svg>")
    return ET.fromstring(fragment[start:end])


def _series(root: ET.Element, style: str) -> ET.Element:
    (group,) = [g for g in root.iter(f"{SVG}g") if g.get("class") == f"series {style}"]
    return group


def _chart(**kwargs) -> str:
    front = [html.Point(1000.0 * i, 10.0 + 3 * i, f"#{i}", f"trial {i}") for i in (1, 2, 3)]
    dominated = [html.Point(1500.0 * i, 5.0 + i, hover="dominated") for i in (1, 2)]
    failed = [html.Point(900.0, 1.0, hover="over budget")]
    original = [html.Point(6000.0, 60.0, "fp32", "original")]
    return html.scatter(
        [
            html.Series("Pareto", front, line="step"),
            html.Series("dominated", dominated, "muted"),
            html.Series("over budget", failed, "failed"),
            html.Series("original", original, "reference"),
        ],
        html.Axis("size (KB)", log=True, better="low"),
        html.Axis("SQNR (dB)", better="high"),
        title="size vs fidelity",
        **kwargs,
    )


def test_scatter_draws_each_series_in_its_style():
    root = _svg(_chart())
    front = _series(root, "primary")
    assert len(front.findall(f"{SVG}circle")) == 3
    assert {c.get("fill") for c in front.findall(f"{SVG}circle")} == {"#1f6feb"}
    assert len(front.findall(f"{SVG}polyline")) == 1  # the front's staircase
    muted = _series(root, "muted").findall(f"{SVG}circle")
    assert len(muted) == 2 and {c.get("fill") for c in muted} == {"#a0a4a8"}
    assert len(_series(root, "failed").findall(f"{SVG}path")) == 1
    assert len(_series(root, "reference").findall(f"{SVG}path")) == 1
    hovers = [t.text for t in _series(root, "primary").iter(f"{SVG}title")]
    assert hovers == ["trial 1", "trial 2", "trial 3"]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "size (KB) [log] (lower is better)" in texts
    assert "SQNR (dB) (higher is better)" in texts
    assert {"Pareto", "dominated", "over budget", "original"} <= set(texts)


def test_scatter_maps_values_monotonically_and_inside_the_plot():
    root = _svg(_chart(width=500, height=300))
    circles = _series(root, "primary").findall(f"{SVG}circle")
    xs = [float(c.get("cx")) for c in circles]
    ys = [float(c.get("cy")) for c in circles]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # y grows upwards
    assert all(64 <= x <= 500 - 16 for x in xs) and all(28 <= y <= 300 - 64 for y in ys)
    # log axis: 1000 -> 2000 -> 3000 steps shrink
    assert xs[1] - xs[0] > xs[2] - xs[1]


def test_step_line_goes_across_then_up():
    root = _svg(_chart())
    (line,) = _series(root, "primary").findall(f"{SVG}polyline")
    coords = [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
    assert len(coords) == 5  # 3 points + 2 corners
    assert coords[1][1] == coords[0][1] and coords[1][0] == coords[2][0]


def test_labels_near_the_right_edge_are_written_leftwards():
    points = [html.Point(1.0, 1.0, "left"), html.Point(2.0, 2.0, "right edge")]
    root = _svg(html.scatter([html.Series("s", points)], html.Axis("x"), html.Axis("y")))
    labels = {t.text: t for t in root.iter(f"{SVG}text") if t.get("class") == "pt-label"}
    assert labels["left"].get("text-anchor") is None
    assert labels["right edge"].get("text-anchor") == "end"


def test_points_without_a_finite_coordinate_are_counted_not_drawn():
    points = [
        html.Point(1.0, 2.0),
        html.Point(2.0, math.inf),
        html.Point(None, 1.0),
        html.Point(0.0, 1.0),  # not drawable on a log axis
    ]
    fragment = html.scatter([html.Series("s", points)], html.Axis("x", log=True), html.Axis("y"))
    assert len(_series(_svg(fragment), "primary").findall(f"{SVG}circle")) == 1
    assert "3 point(s) without a finite value on an axis are not drawn." in fragment


def test_ticks_are_round_and_inside_the_range():
    assert html._ticks((0.0, 10.0), log=False) == [0, 2, 4, 6, 8, 10]
    assert html._ticks((0.05, 0.95), log=False) == [0.2, 0.4, 0.6, 0.8]
    assert html._ticks((math.log10(900), math.log10(6000)), log=True) == [1000, 2000, 5000]
    assert html._range([5.0, 5.0], log=False) == (4.5, 5.5)
    narrow = html._ticks((math.log10(51000), math.log10(68000)), log=True)
    assert narrow == [55000, 60000, 65000]  # under a decade: round linear values


def test_bad_style_or_line_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="style 'grey'"):
        html.Series("s", [], style="grey")
    with pytest.raises(ValueError, match="line 'dashed'"):
        html.Series("s", [], line="dashed")


def test_table_escapes_text_and_aligns_numbers():
    fragment = html.table(
        ["name", "size"], [["<b>x</b>", 1234], ["y", 0.5], ["z", None]], row_classes=["primary"]
    )
    assert "&lt;b&gt;x&lt;/b&gt;" in fragment and "<b>" not in fragment
    assert '<td class="num">1,234</td>' in fragment and '<td class="num">0.5</td>' in fragment
    assert fragment.count('<tr class="primary">') == 1
    assert ET.fromstring(fragment).find("table/tbody") is not None  # well-formed


def test_page_is_self_contained(tmp_path: Path):
    document = html.page(
        "Title & more",
        html.charts(_chart()),
        html.section("Facts", html.definition_list([("a", 1)]), html.paragraph("x", code=True)),
        subtitle="sub",
    )
    assert "<script" not in document
    assert "http://" not in document.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in document
    assert "<title>Title &amp; more</title>" in document
    target = html.write_page(document, tmp_path / "page.html")
    assert target.read_text(encoding="utf-8") == document
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary left


def test_format_bytes():
    assert html.format_bytes(512) == "512 B"
    assert html.format_bytes(55325) == "55.3 kB"  # decimal units everywhere
    assert html.format_bytes(3_000_000) == "3 MB"


def test_page_renders_in_a_headless_browser(tmp_path: Path):
    page = html.write_page(
        html.page("chart", html.charts(_chart(), _chart()), html.table(["a"], [[1]])),
        tmp_path / "page.html",
    )
    shot = render(page, tmp_path / "page.png")
    assert shot.console == []
    colours, covered = ink(shot.png)
    assert colours > 20 and covered > 0.01  # text, grid, markers: not a blank page


def test_browser_check_sees_console_errors(tmp_path: Path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body>x<script>console.error('boom')</script></body></html>")
    shot = render(page, tmp_path / "broken.png", width=300, height=200)
    assert any("boom" in message for message in shot.console)
