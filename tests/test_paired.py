"""Paired comparisons per image: known answers for the bootstrap interval and the verdict, the per-image values
read off a front, and the frontier tables that carry them."""

from __future__ import annotations

import json

import pytest

from catlab.evaluation import frontier
from catlab.evaluation.frontier import Frontier, Point
from catlab.evaluation.paired import (
    PER_IMAGE,
    Paired,
    from_json,
    paired_difference,
    to_json,
    values_at,
)
from tests.test_frontier import rows_and_specs


def images(values):
    return {(i, 0): float(v) for i, v in enumerate(values)}


def test_a_constant_difference_has_a_point_interval_and_wins():
    d = paired_difference(images([3, 4, 5, 6]), images([2, 3, 4, 5]))
    assert (d.mean, d.low, d.high, d.n) == (1.0, 1.0, 1.0, 4)
    assert d.verdict == "win" and d.cell() == "+1.00 [+1.00, +1.00] win"
    assert paired_difference(images([2, 3, 4, 5]), images([3, 4, 5, 6])).verdict == "loss"


def test_differences_of_both_signs_tie():
    # +1 and -1 alternating over 40 images: mean 0, the interval holds zero
    d = paired_difference(images([1, -1] * 20), images([0] * 40))
    assert d.mean == 0.0 and d.low < 0 < d.high and d.verdict == "tie"


def test_a_large_mean_gap_with_spread_still_ties_when_few_images_carry_it():
    # one image 10 dB better, the other four 1 dB worse: mean +1.2, but the interval reaches below zero
    d = paired_difference(images([10, -1, -1, -1, -1]), images([0] * 5))
    assert d.mean == pytest.approx(1.2) and d.verdict == "tie"


def test_the_interval_is_deterministic_and_pairs_by_image():
    a = images([1.0, 2.5, 0.3, 4.0, 2.2, 1.1])
    b = images([0.5, 2.0, 0.1, 3.0, 2.5, 0.2])
    assert paired_difference(a, b) == paired_difference(dict(reversed(a.items())), b)
    # images only one side has are left out
    extra = {**a, (99, 0): 100.0}
    assert paired_difference(extra, b) == paired_difference(a, b)
    assert paired_difference(images([1.0]), images([0.0])) is None  # one image: no interval


def test_the_bootstrap_interval_matches_the_normal_one_on_many_images():
    import numpy as np

    rng = np.random.default_rng(1)
    diffs = rng.normal(0.5, 1.0, size=400)
    d = paired_difference(images(diffs), images([0] * 400))
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(400)
    assert d.low == pytest.approx(diffs.mean() - half, abs=0.02)
    assert d.high == pytest.approx(diffs.mean() + half, abs=0.02)


def test_values_at_interpolates_each_image_like_the_mean():
    per_image = {
        "a": {(0, 0): {"psnr": 40.0}, (1, 0): {"psnr": 30.0}},
        "b": {(0, 0): {"psnr": 20.0}, (1, 0): {"psnr": 30.0}},
    }
    front = [Point("a", "f", 1.0, 35.0, key="a"), Point("b", "f", 3.0, 25.0, key="b")]
    v = values_at(front, 1.5, per_image, "psnr")
    assert v == {(0, 0): pytest.approx(35.0), (1, 0): pytest.approx(30.0)}
    assert sum(v.values()) / 2 == pytest.approx(frontier.value_at(front, 1.5))
    assert values_at(front, 3.5, per_image, "psnr") is None  # never extrapolated
    assert values_at(front, 2.0, {"a": per_image["a"]}, "psnr") is None  # a point's records missing


def per_image_for(rows):
    """Per-image PSNR around each row's mean: 20 images alternating +-2 dB, so the means are the rows' and two
    rows' differences are the same on every image."""
    out = {}
    for r in rows:
        if r.get("psnr") is None:
            continue
        spread = [(-1) ** i * 2.0 for i in range(20)]
        out[r["key"]] = {(i, 0): {"psnr": r["psnr"] + s, "ssim": r["ssim"]} for i, s in enumerate(spread)}
    return out


def test_frontier_tables_say_win_where_the_interval_excludes_zero(tmp_path):
    rows, specs = rows_and_specs()
    frontier.write(rows, specs, tmp_path, "hand-made", per_image_for(rows))
    md = (tmp_path / "frontier.md").read_text()
    # at 2.5x the budget schedule (38.5) against TaylorSeer (35.0): every image +3.5 (same spread pattern)
    assert "+3.50 [+3.50, +3.50] win" in md
    assert "#### Paired per image, PSNR (dB): catlab's best family against each peer" in md
    fr = Frontier.from_rows(rows, specs, per_image_for(rows))
    assert fr.paired("psnr", "budget_schedule + taylor", "TaylorSeer", 2.5) == Paired(3.5, 3.5, 3.5, 20)


def test_frontier_says_tie_when_per_image_noise_swamps_the_margin(tmp_path):
    rows, specs = rows_and_specs()
    per_image = per_image_for(rows)
    # TaylorSeer's images: the same mean, but its spread runs the other way: differences +-4 around +3.5 at 2.5x
    for key in ("ts2", "ts4"):
        per_image[key] = {
            i: {**m, "psnr": 2 * next(r["psnr"] for r in rows if r["key"] == key) - m["psnr"]}
            for i, m in per_image[key].items()
        }
    fr = Frontier.from_rows(rows, specs, per_image)
    d = fr.paired("psnr", "budget_schedule + taylor", "TaylorSeer", 2.5)
    assert d.mean == pytest.approx(3.5) and d.verdict == "win"  # +7.5 / -0.5 alternating: still above zero
    for key in ("ts2", "ts4"):
        per_image[key] = {i: {**m, "psnr": m["psnr"] + (8.0 if i[0] % 2 else -8.0)} for i, m in per_image[key].items()}
    d = Frontier.from_rows(rows, specs, per_image).paired("psnr", "budget_schedule + taylor", "TaylorSeer", 2.5)
    assert d.mean == pytest.approx(3.5) and d.verdict == "tie"


def test_per_image_values_travel_through_json_and_the_command_line(tmp_path, capsys):
    rows, specs = rows_and_specs()
    per_image = per_image_for(rows)
    assert from_json(json.loads(json.dumps(to_json(per_image)))) == per_image
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "evaluation.json").write_text(
        json.dumps({"strategies": [{"key": k, "label": s["name"], "spec": s} for k, s in specs.items()]})
    )
    (tmp_path / PER_IMAGE).write_text(json.dumps(to_json(per_image)))
    frontier.main([str(tmp_path)])
    assert "[95 % CI]" in capsys.readouterr().out


def test_without_per_image_values_the_tables_are_as_before(tmp_path):
    rows, specs = rows_and_specs()
    frontier.write(rows, specs, tmp_path, "hand-made")
    assert "95 % CI" not in (tmp_path / "frontier.md").read_text()


def test_video_frontiers_compare_the_psnr_winners_temporal_error(tmp_path):
    """With per-video temporal errors the tables say whether catlab's PSNR winner moves less like the full
    model's video than each peer (lower is better): here catlab's is 0.01 lower on every video at 2.5x."""
    rows, specs = rows_and_specs()
    per_image = per_image_for(rows)
    for r in rows:
        if r["key"] in per_image:
            err = 0.05 if specs[r["key"]].get("name") == "full" else 0.04
            per_image[r["key"]] = {i: {**m, "temporal_error": err} for i, m in per_image[r["key"]].items()}
    frontier.write(rows, specs, tmp_path, "hand-made", per_image)
    md = (tmp_path / "frontier.md").read_text()
    assert "#### Temporal error of the PSNR winners (videos; lower is better)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| 2.5× | budget_schedule + taylor | 0.0400 |"))
    assert "-0.0100 [-0.0100, -0.0100] better" in line
    frontier.write(rows, specs, tmp_path, "hand-made", per_image_for(rows))  # images: no such table
    assert "Temporal error" not in (tmp_path / "frontier.md").read_text()
