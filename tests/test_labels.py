"""Strategy labels name one strategy each, and the file names made from them are one safe path component."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import catlab  # noqa: F401  (registers the built-in components)
from catlab.evaluate import strategy_specs
from catlab.hashing import folder_name
from catlab.strategy import resolve_strategy
from tests.conftest import ROOT

GROUPS = OmegaConf.create({"reuse": None, "stepcache": None, "kv": None})
#: the pair that once shared a label, and so one images/ folder, in a head-to-head
PAIR = [
    {"name": "cat", "alpha": a, "reuse": "taylor", "stepcache": {"name": "taylorseer", "cache_interval": 2}}
    for a in (0.6, 0.5)
]
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.=,+_-]*")


def _experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if "strategies:" in p.read_text())


def _safe(name: str) -> bool:
    return bool(SAFE.fullmatch(name)) and len(name) <= 89 and Path(name).name == name


def test_two_strategies_differing_only_in_alpha_get_two_labels_and_two_folders(tmp_path):
    a, b = (resolve_strategy(spec, GROUPS) for spec in PAIR)
    assert a.label == "cat[alpha=0.6,reuse=taylor,stepcache=taylorseer(cache_interval=2)]"
    assert b.label == "cat[alpha=0.5,reuse=taylor,stepcache=taylorseer(cache_interval=2)]"
    folders = {folder_name(s.label, s.key({})) for s in (a, b)}
    assert len(folders) == 2 and all(_safe(f) for f in folders)
    for f in folders:  # one folder each, side by side under images/
        (tmp_path / "images" / f).mkdir(parents=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(folders)


def test_labels_stay_short_where_the_settings_are_the_defaults():
    assert resolve_strategy({"name": "cat", "alpha": 0.3, "start_step": 8}, GROUPS).label == "cat"
    assert resolve_strategy({"name": "cat", "boost": [3, 2]}, GROUPS).label == "cat"  # a list equal to the default
    assert resolve_strategy({"name": "cat", "alpha": 1 / 3}, GROUPS).label == "cat[alpha=0.3333333333333333]"
    assert resolve_strategy({"name": "cat", "reuse": "copy"}, GROUPS).label == "cat"  # copy is no reuse rule
    kv = OmegaConf.create({"reuse": None, "stepcache": None, "kv": "taylor"})
    assert resolve_strategy("cat", kv).label == "cat[kv=taylor]"  # a top-level part that changes the strategy


def test_no_label_makes_a_nested_or_hidden_folder():
    spec = {"name": "budget_schedule", "pattern": [1, 0, 0], "reuse": "taylor"}
    label = resolve_strategy(spec, GROUPS).label
    assert label == "budget_schedule[pattern=1/0/0,reuse=taylor]"  # the table keeps the label as it is
    for hostile in (label, "../../etc/passwd", ".hidden", "a/b\\c", "x" * 500, "", "—", "a\nb"):
        name = folder_name(hostile, "key")
        assert _safe(name), name
    assert folder_name("a/b", "k1") != folder_name("a_b", "k2")  # alike slugs, distinct keys: distinct names


@pytest.mark.parametrize("experiment", _experiments())
def test_every_experiments_strategies_have_distinct_labels_and_folders(experiment):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"experiment={experiment}"])
    strategies = [resolve_strategy(spec, cfg) for spec in strategy_specs(cfg)]
    keys = {s.key({}) for s in strategies}
    labels = {s.label for s in strategies}
    folders = {folder_name(s.label, s.key({})) for s in strategies}
    assert len(labels) == len(keys) == len(folders), experiment
    assert all(_safe(f) for f in folders)


@pytest.mark.slow
def test_an_evaluation_keeps_each_strategys_images_apart(tmp_path):
    """The pair that once shared images/ and samples_*.png, evaluated: one folder and one grid each, none nested."""
    from catlab.evaluate import run

    pair = ",".join(
        f"{{name:cat,alpha:{a},start_step:2,reuse:taylor,stepcache:{{name:taylorseer,cache_interval:2}}}}"
        for a in (0.6, 0.5)
    )
    overrides = [
        "model=tiny_sd3",
        "model.num_layers=2",
        "model.height=16",
        "model.width=16",
        "sampler.num_steps=5",
        f"strategies=[{pair}]",
        "batch_size=2",
        "prompts.prompts=[a red circle,a blue square]",
        "metrics=[psnr]",
        f"cache_dir={tmp_path / 'cache'}",
        "diagnostics=false",
        "logger=local",
        "clusterer=grid",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    out = tmp_path / "out"
    out.mkdir()
    rows = run(cfg, out)
    labels = [r["method"] for r in rows]
    assert len(set(labels)) == len(labels) == 3 and labels[1] != labels[2]
    folders = sorted(p for p in (out / "images").iterdir())
    assert len(folders) == 3 and all(_safe(p.name) for p in folders)
    names = {tuple(sorted(f.name for f in p.iterdir())) for p in folders}
    assert len(names) == 1 and len(names.pop()) == 2 and all(f.suffix == ".png" for p in folders for f in p.iterdir())
    assert len(list(out.glob("samples_*.png"))) == 3
