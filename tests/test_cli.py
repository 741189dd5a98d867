"""``python -m catlab.run`` end to end: outputs, multirun, and errors before compute."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import FAST, run_cli


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_full_and_random_write_metrics_images_and_config(tmp_path):
    proc, full_dir = run_cli("selector=full", *FAST, tmp_path=tmp_path / "full")
    assert re.search(r"generation: (\d+)/\1 images \(100%\), elapsed \d+", proc.stdout + proc.stderr)  # piped: lines
    _, rand_dir = run_cli("selector=random", "selector.start_step=2", *FAST, tmp_path=tmp_path / "random")
    full, rand = _metrics(full_dir), _metrics(rand_dir)
    for m, d in ((full, full_dir), (rand, rand_dir)):
        assert {"macs_per_image", "macs_ratio", "seconds_per_image"} <= set(m)
        assert len(list((d / "images").glob("*.png"))) == 2
        assert "selector:" in (d / "config.yaml").read_text()
    assert full["macs_ratio"] == pytest.approx(1.0)
    assert rand["macs_ratio"] > 1.5
    assert rand["macs_per_image"] < full["macs_per_image"]


@pytest.mark.slow
def test_multirun_writes_one_directory_per_job(tmp_path):
    proc, _ = run_cli("-m", "selector=full,random", *FAST, tmp_path=tmp_path)
    assert "sweep: 2/2 jobs (100%)" in proc.stdout + proc.stderr  # the sweep's progress, piped
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    names = {_metrics(j)["selector"] for j in jobs}
    assert names == {"full", "random"}


@pytest.mark.slow
def test_wandb_logger_runs_offline(tmp_path):
    _, run_dir = run_cli(
        "selector=random",
        "selector.start_step=2",
        "sampler.num_steps=4",
        "sampler.progress=false",
        "logger=wandb",
        tmp_path=tmp_path,
    )
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the offline run (what `wandb sync` uploads) holds the run's config, its metrics and its sample grid
    records = b"".join(f.read_bytes() for f in runs[0].glob("run-*.wandb"))
    for key in (b"selector=random", b"macs_ratio", b"seconds_per_image"):
        assert key in records, key
    metrics = _metrics(run_dir)
    assert metrics["selector"] == "random" and f"{metrics['macs_ratio']!r}".encode()[:6] in records
    assert list((runs[0] / "files" / "media" / "images").glob("samples_*.png"))


BAD_CONFIGS = [
    (
        "+selector.alpah=0.3",
        "selector 'random' has no config key(s) ['alpah']; allowed: ['alpha', 'seed', 'start_step']",
    ),
    ("selector.alpah=0.3", "Key 'alpah' is not in struct"),
    ("sampler.num_step=3", "Key 'num_step' not in 'SamplerConfig'"),
    ("selector.alpha=1.5", "alpha must be in (0, 1]"),
    ("selector.alpha=0", "alpha must be in (0, 1]"),
    ("selector.start_step=10", "start_step=10 must be < num_steps=10"),
    ("selector=nope", "Available options in 'selector'"),
    ("selector.name=nope", "unknown selector 'nope'; registered: "),
    ("model.name=unet", "unknown model 'unet'; registered: "),
    ("batch_size=0", "batch_size must be >= 1"),
]


@pytest.mark.parametrize("override, message", BAD_CONFIGS)
def test_bad_config_is_named_before_compute(override, message):
    """Composed in-process with Hydra's compose API, then checked the way catlab.run checks it."""
    from hydra import compose, initialize_config_dir

    from catlab.run import prepare
    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        with pytest.raises(Exception) as err:
            prepare(compose(config_name="config", overrides=["selector=random", *FAST, override]))
    text = str(err.value) + str(getattr(err.value, "__cause__", ""))
    assert message in text
    if "registered" in message:
        assert "random" in text or "tiny_sd3" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [BAD_CONFIGS[0], ("selector=nope", "catlab: unknown option 'selector=nope' (did you mean 'selector=noise'?)")],
)
def test_cli_exits_nonzero_with_the_message(tmp_path, override, message):
    proc, run_dir = run_cli("selector=random", override, *FAST, tmp_path=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (run_dir / "metrics.json").exists()


def test_a_sweeps_progress_stays_out_of_what_process_launchers_send_their_workers():
    """Hydra's process launchers pickle the callbacks for their workers; the progress (a thread and a lock) stays
    home, and the other state goes with them."""
    import pickle

    from catlab.progress import Progress
    from catlab.sweep import SweepSummary

    summary = SweepSummary()
    summary.progress, summary.other = Progress(2, "sweep", "jobs", tty=False), "kept"
    try:
        sent = pickle.loads(pickle.dumps(summary))
    finally:
        summary.progress.close()
    assert sent.progress is None and sent.other == "kept"
