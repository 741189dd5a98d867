"""The quality frontier: fronts, interpolation, families and the best-per-budget table on hand-made points."""

import json

import pytest

from catlab.evaluation import frontier
from catlab.evaluation.frontier import Frontier, Point, family_of, nearest, pareto_front, value_at


def pts(*xy, family="f"):
    return [Point(f"p{i}", family, x, y) for i, (x, y) in enumerate(xy)]


def test_pareto_front_drops_dominated_points_and_sorts_by_ratio():
    p = pts((1.5, 40.0), (2.0, 38.0), (1.8, 37.0), (2.5, 38.0), (3.0, 30.0), (1.4, 39.0))
    front = pareto_front(p)
    # (1.8, 37) is beaten by (2.0, 38); (2.0, 38) by (2.5, 38) (same quality, cheaper); (1.4, 39) by (1.5, 40)
    assert [(q.x, q.y) for q in front] == [(1.5, 40.0), (2.5, 38.0), (3.0, 30.0)]


def test_pareto_front_keeps_one_of_exact_duplicates():
    assert len(pareto_front(pts((2.0, 30.0), (2.0, 30.0)))) == 1


def test_value_at_interpolates_linearly_between_front_points_and_never_extrapolates():
    front = pareto_front(pts((1.5, 40.0), (2.5, 36.0), (3.5, 30.0)))
    assert value_at(front, 2.0) == pytest.approx(38.0)
    assert value_at(front, 3.0) == pytest.approx(33.0)
    assert value_at(front, 2.5) == pytest.approx(36.0)  # a measured point is its own value
    assert value_at(front, 1.4) is None and value_at(front, 3.6) is None
    assert value_at([], 2.0) is None
    assert value_at(pareto_front(pts((2.0, 31.0))), 2.0) == 31.0


def test_value_at_uses_the_front_not_a_dominated_point_in_between():
    # (2.0, 30) lies under the segment (1.5, 40)-(2.5, 36): the family can do 38 at 2x by its front
    front = pareto_front(pts((1.5, 40.0), (2.0, 30.0), (2.5, 36.0)))
    assert value_at(front, 2.0) == pytest.approx(38.0)


def test_nearest_measured_point():
    p = pts((1.5, 40.0), (2.2, 35.0), (2.8, 33.0))
    assert nearest(p, 2.6).x == 2.8 and nearest(p, 2.4).x == 2.2 and nearest(p, 1.0).x == 1.5
    assert nearest([], 2.0) is None


def test_family_of_names_the_method_not_its_knob():
    assert family_of({"name": "full", "stepcache": {"name": "taylorseer", "cache_interval": 3}}) == "TaylorSeer"
    assert (
        family_of(
            {"name": "full", "stepcache": {"name": "taylorseer", "cache_interval": 5, "max_order": 2, "start_step": 4}}
        )
        == "TaylorSeer order 2"
    )
    assert (
        family_of(
            {"name": "full", "stepcache": {"name": "cachedit_dbcache", "threshold": 0.4, "calibrator": "taylorseer"}}
        )
        == "DBCache + taylorseer calibrator"
    )
    assert family_of({"name": "cat", "alpha": 0.2, "start_step": 8}) == "cat"
    assert family_of({"name": "cat", "alpha": 0.2, "reuse": "copy"}) == "cat"
    assert (
        family_of({"name": "budget_schedule", "pattern": [1, 0, 0], "reuse": "taylor"}) == "budget_schedule + taylor"
    )
    assert (
        family_of({"name": "budget_schedule", "inner": "forecast_error", "pattern": [1, 0.2], "reuse": "taylor"})
        == "budget_schedule(forecast_error) + taylor"
    )
    assert (
        family_of({"name": "cat", "alpha": 0.6, "reuse": "taylor", "stepcache": {"name": "taylorseer"}})
        == "cat + taylor inside TaylorSeer"
    )


def rows_and_specs():
    """Two step caches and one catlab strategy with known fronts."""
    specs, rows = {}, []

    def add(key, spec, ratio, psnr, ssim):
        specs[key] = spec
        rows.append(
            {"key": key, "method": spec["name"], "alpha": 1.0, "macs_ratio": ratio, "psnr": psnr, "ssim": ssim}
        )

    add("full", {"name": "full"}, 1.0, None, None)
    add("ts2", {"name": "full", "stepcache": {"name": "taylorseer", "cache_interval": 2}}, 1.5, 45.0, 0.99)
    add("ts4", {"name": "full", "stepcache": {"name": "taylorseer", "cache_interval": 4}}, 2.5, 35.0, 0.95)
    add("mc1", {"name": "full", "stepcache": {"name": "mag_cache", "threshold": 0.1}}, 1.8, 40.0, 0.97)
    add("mc2", {"name": "full", "stepcache": {"name": "mag_cache", "threshold": 0.3}}, 3.0, 30.0, 0.90)
    add("b3", {"name": "budget_schedule", "pattern": [1, 0, 0], "reuse": "taylor"}, 2.0, 43.0, 0.98)
    add("b5", {"name": "budget_schedule", "pattern": [1, 0, 0, 0, 0], "reuse": "taylor"}, 3.0, 34.0, 0.93)
    return rows, specs


def test_best_per_budget_interpolates_each_family_and_names_the_nearest_point():
    fr = Frontier.from_rows(*rows_and_specs())
    assert fr.peers == {"TaylorSeer", "MagCache"}
    assert set(fr.families()) == {"TaylorSeer", "MagCache", "budget_schedule + taylor"}  # the full model is none
    # at 2.5x: TaylorSeer 35.0 (measured), MagCache 40 + (30-40)*(0.7/1.2) = 34.1667, budget 43 + (34-43)*0.5 = 38.5
    fam, v, p = fr.best("psnr", 2.5)
    assert fam == "budget_schedule + taylor" and v == pytest.approx(38.5)
    assert p.x in (2.0, 3.0)  # equally near: the better of the two
    assert p.y == 43.0
    peer = fr.best("psnr", 2.5, fr.peers)
    assert peer[0] == "TaylorSeer" and peer[1] == pytest.approx(35.0)
    # at 1.5x only TaylorSeer has points on both sides (its 1.5x point); at 3x MagCache and the budget schedule
    assert fr.best("psnr", 1.5)[0] == "TaylorSeer"
    assert fr.at("psnr", "budget_schedule + taylor", 1.5)[0] is None
    assert fr.best("psnr", 3.0)[1] == pytest.approx(34.0)
    assert fr.best("psnr", 3.6) is None
    # SSIM has its own fronts: at 2x TaylorSeer 0.97 (halfway 0.99 -> 0.95) beats MagCache 0.9583
    assert fr.best("ssim", 2.0, fr.peers)[:2] == ("TaylorSeer", pytest.approx(0.97))


def test_write_makes_the_tables_and_figures(tmp_path):
    rows, specs = rows_and_specs()
    frontier.write(rows, specs, tmp_path, "hand-made")
    md = (tmp_path / "frontier.md").read_text()
    assert "| 2.5× | budget_schedule + taylor | 38.50 |" in md
    assert (
        "| 3× | budget_schedule + taylor | 34.00 | pattern=1/0/0/0/0 (3.00×, 34.00) | MagCache | 30.00 | +4.00 |" in md
    )
    assert (tmp_path / "frontier_psnr.png").stat().st_size > 0 and (tmp_path / "frontier_ssim.png").exists()
    lines = (tmp_path / "frontier.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 3 * len(frontier.BUDGETS)  # header + quality x family x budget


def test_command_line_rebuilds_from_a_run_directory(tmp_path, capsys):
    rows, specs = rows_and_specs()
    (tmp_path / "results.json").write_text(json.dumps(rows))
    (tmp_path / "evaluation.json").write_text(
        json.dumps({"strategies": [{"key": k, "label": s["name"], "spec": s} for k, s in specs.items()]})
    )
    frontier.main([str(tmp_path)])
    assert "Best by PSNR" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="results.json"):
        frontier.main([str(tmp_path / "missing")])


def test_the_nearest_point_shown_is_on_the_front_and_carries_its_speedup():
    rows, specs = rows_and_specs()
    specs["b4"] = {"name": "budget_schedule", "pattern": [1, 0, 0, 0], "reuse": "taylor"}
    rows.append(
        {"key": "b4", "method": "budget_schedule", "macs_ratio": 2.45, "psnr": 30.0, "ssim": 0.9, "speedup": 2.4}
    )
    fr = Frontier.from_rows(rows, specs)
    value, point = fr.at("psnr", "budget_schedule + taylor", 2.5)
    assert value == pytest.approx(38.5) and point.x != 2.45  # (2.45, 30) is beaten by (3.0, 34)
    assert [p.speedup for p in fr.points["psnr"]["budget_schedule + taylor"]] == [None, None, 2.4]


def test_other_groups_token_level_methods_are_peers():
    rows, specs = rows_and_specs()
    specs["r"] = {"name": "ras", "alpha": 0.3}
    rows.append({"key": "r", "method": "ras", "macs_ratio": 2.0, "psnr": 44.0, "ssim": 0.99})
    fr = Frontier.from_rows(rows, specs)
    assert fr.peers == {"TaylorSeer", "MagCache", "ras"}
    assert fr.best("psnr", 2.0, fr.peers)[0] == "ras"  # the best peer at 2x is now RAS
    assert frontier.is_peer({"name": "full", "stepcache": {"name": "faster_cache"}})
    assert not frontier.is_peer({"name": "cat", "alpha": 0.3}) and not frontier.is_peer({"name": "full"})
