"""Sinks: W&B (offline, read back from disk), local CSV/JSON, terminal tables, density plots."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from visualization.sinks import ArmSinks
from tests.wandb_readback import OfflineRun, merge_segments, read_offline_run, read_offline_runs
from visualization import wandb_sink
from config.files import read_json, write_json_atomic
from visualization.local_sink import MetricsCSV
from visualization.plots import density_floor, density_histogram, log10_density, save_figure
from visualization.terminal import (boxed_table, format_beside, format_timing, format_value, progress_bar, round_beside,
                                     wrapped_finding)
from visualization.wandb_sink import WandbSink

N_LATENTS = 64
N_EVAL_TOKENS = 1000


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline W&B with every wandb folder inside tmp_path and no way to reach a server."""
    env = tmp_path / "wandb-env"
    for var, sub in [("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")]:
        (env / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(env / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # fails fast if anything tried the network
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc credentials
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "runs"


def fake_density(seed: int = 0) -> np.ndarray:
    """Firing frequencies over N_EVAL_TOKENS tokens with 5 dead latents."""
    rng = np.random.default_rng(seed)
    density = np.round(10 ** rng.uniform(-3, -0.5, N_LATENTS) * N_EVAL_TOKENS) / N_EVAL_TOKENS
    density[:5] = 0.0
    return density


def train_metrics(step: int) -> dict[str, float]:
    return {"train/loss": 1.0 / step, "train/mse": 0.5 / step, "train/l0": 8.0 + step, "train/lr": 1e-3}


def eval_metrics(step: int) -> dict[str, float]:
    return {"eval/mse": 0.1 / step, "eval/explained_variance": 1 - 0.1 / step, "eval/l0": 8.0}


def test_offline_run_round_trip(wandb_env: Path, capfd: pytest.CaptureFixture[str]) -> None:
    sink = WandbSink(project="sae-test", root_dir=wandb_env)
    config = {"d_sae": N_LATENTS, "k": 8, "optim": {"lr": 1e-3}}
    run_id = sink.start(name="topk-k8", group="activations-20261121-1200", job_type="activations", config=config)
    assert run_id and sink.run_dir is not None and sink.run_dir.is_relative_to(wandb_env)
    density = fake_density()
    for step in range(1, 5):
        sink.log(step, step * 1024, train_metrics(step))
        if step % 2 == 0:
            sink.log(step, step * 1024, eval_metrics(step))
            sink.log_density(step, step * 1024, density, N_EVAL_TOKENS, 0.1)
    sink.finish({"final/explained_variance": 0.95, "final/fvu": 0.05})
    err = capfd.readouterr().err
    assert err.count("W&B logging offline") == 1 and "wandb sync" not in err  # ours printed, wandb's own silenced
    assert sink.sync_command() == f"wandb sync \\\n    {sink.run_dir}"

    run = read_offline_run(sink.run_dir)
    assert (run.run_id, run.name, run.group, run.job_type, run.project) == (
        run_id, "topk-k8", "activations-20261121-1200", "activations", "sae-test")
    assert run.config == config
    assert run.steps("train/loss") == [1, 2, 3, 4]
    assert run.values("train/loss") == [1.0, 0.5, 1 / 3, 0.25]
    assert run.values("tokens") == [1024, 2048, 3072, 4096]
    assert run.steps("eval/explained_variance") == [2, 4]
    assert run.values("eval/explained_variance") == [0.95, 0.975]
    assert {"train/l0", "train/lr", "eval/mse", "density/hist", "density/plot"} <= set(run.keys())

    assert run.steps("density/hist") == [2, 4]
    hist = run.values("density/hist")[-1]
    assert hist["_type"] == "histogram"
    assert sum(hist["values"]) == N_LATENTS
    assert hist["bins"][0] == pytest.approx(density_floor(N_EVAL_TOKENS))
    assert hist["values"][0] == 5  # the never-fired latents, alone in the floor bin
    plot = run.values("density/plot")[-1]
    assert plot["_type"] == "image-file" and (sink.run_dir / "files" / plot["path"]).is_file()

    assert run.summary["final/explained_variance"] == 0.95
    assert run.summary["final/fvu"] == 0.05


def test_resumed_run_appends_segments(wandb_env: Path) -> None:
    sink = WandbSink(project="sae-test", root_dir=wandb_env)
    meta = dict(name="relu", group="activations-20261121-1200", job_type="activations", config={"l1": 5.0})
    run_id = sink.start(**meta)
    for step in range(1, 6):
        sink.log(step, step * 100, train_metrics(step))
    sink.finish({"final/first_segment": 1.0})
    first_dir = sink.run_dir

    # The resumed process restores step 5 from its checkpoint and logs explicit later steps.
    assert sink.start(**meta, run_id=run_id) == run_id
    for step in range(6, 11):
        sink.log(step, step * 100, train_metrics(step))
    sink.finish({"final/explained_variance": 0.9})

    assert sink.run_dir != first_dir  # offline, each segment is its own folder
    run = read_offline_runs(wandb_env, run_id)
    assert run.run_dirs == [first_dir.resolve(), sink.run_dir.resolve()]
    assert run.steps("train/loss") == list(range(1, 11))
    assert run.values("tokens") == [s * 100 for s in range(1, 11)]
    assert run.values("train/loss") == [1.0 / s for s in range(1, 11)]
    assert run.summary["final/first_segment"] == 1.0 and run.summary["final/explained_variance"] == 0.9
    assert (run.name, run.group, run.config) == ("relu", "activations-20261121-1200", {"l1": 5.0})


def test_merge_drops_steps_the_run_already_has() -> None:
    killed_early = OfflineRun(run_dirs=[Path("a")])  # died before its first flush: header only
    first = OfflineRun(run_id="r", name="arm", start_time="t1", run_dirs=[Path("b")],
                       history=[{"_step": s, "x": s} for s in (1, 2, 3)], summary={"a": 1})
    resumed = OfflineRun(run_id="r", name="arm", start_time="t2", run_dirs=[Path("c")],
                         history=[{"_step": s, "x": 10 * s} for s in (3, 4)], summary={"b": 2})
    run = merge_segments([killed_early, first, resumed])
    assert [(row["_step"], row["x"]) for row in run.history] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert (run.run_id, run.name, run.summary, run.run_dirs) == ("r", "arm", {"a": 1, "b": 2},
                                                                  [Path("a"), Path("b"), Path("c")])


KILLED_ARM = """
import os, signal, sys, time
from pathlib import Path
from tests.wandb_readback import read_offline_run
from visualization.wandb_sink import WandbSink
sink = WandbSink(project="sae-test", root_dir=Path(sys.argv[1]))
print(sink.start(name="arm", group="g", job_type="activations", config={}), flush=True)
step, size = 0, -1
# Log slowly (wandb's write buffer never fills: only its timed flush writes) until the .wandb file
# on disk holds 5 rows, however long the flushes take on a loaded machine; then die at once.
while True:
    step += 1
    sink.log(step, step, {"train/loss": 1.0 / step})
    time.sleep(0.1)
    log = next(sink.run_dir.glob("*.wandb"), None)
    if step >= 5 and log is not None and log.stat().st_size != size:
        size = log.stat().st_size
        if len(read_offline_run(sink.run_dir).steps("train/loss")) >= 5:
            break
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkilled_run_keeps_flushed_rows(wandb_env: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", KILLED_ARM, str(wandb_env)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = read_offline_runs(wandb_env, proc.stdout.split()[0])
    steps = run.steps("train/loss")
    assert len(steps) >= 5 and steps == list(range(1, len(steps) + 1))  # what was on disk survives, in order


def test_no_credentials_falls_back_to_offline(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WANDB_MODE")
    sink = WandbSink(project="sae-test", root_dir=wandb_env)
    run_id = sink.start(name="arm", group="g", job_type="activations", config={})
    sink.log(1, 10, {"train/loss": 2.0})
    sink.finish({"final/fvu": 0.5})

    err = capfd.readouterr().err
    notices = [line for line in err.splitlines() if "W&B" in line]
    assert notices == [f"W&B logging offline (not logged in to W&B), under {sink.run_dir.parent}"]
    assert sink.run_dir.name.startswith("offline-run-") and sink.run_dir.name.endswith(run_id)
    assert read_offline_run(sink.run_dir).values("train/loss") == [2.0]


def test_online_init_failure_falls_back_to_offline(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    real_init = wandb_sink.wandb.init
    online_attempts = []

    def init_without_network(**kwargs: object) -> object:
        if kwargs["mode"] == "online":
            online_attempts.append(kwargs["id"])
            raise ConnectionError("no route to host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb_sink.wandb, "init", init_without_network)
    sink = WandbSink(project="sae-test", mode="online", root_dir=wandb_env)
    ids = []
    for arm, run_id in [("a", None), ("b", "resumed01")]:
        ids.append(sink.start(name=arm, group="g", job_type="activations", config={}, run_id=run_id))
        sink.log(1, 10, {"train/loss": 1.0})
        sink.finish({})
        assert sink.run_dir.name.startswith("offline-run-") and sink.run_dir.name.endswith(ids[-1])

    assert online_attempts == ids[:1]  # the second arm didn't wait on the network again
    assert ids[1] == "resumed01"  # a checkpointed id survives the fallback
    notices = [line for line in capfd.readouterr().err.splitlines() if "W&B" in line]
    assert len(notices) == 1  # once for all runs
    assert notices[0].startswith("W&B logging offline (online init failed: ConnectionError: no route to host), ")
    dirs = sink.sync_command().split(" \\\n    ")[1:]  # one command uploads both runs
    assert len(dirs) == 2 and [d.rsplit("-", 1)[1] for d in dirs] == ids


def test_online_fallback_leaves_other_open_runs_logging(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """Arms in lockstep: when a later arm's online init fails while an earlier arm's run is open,
    the fallback must not tear down W&B's service (that ends the open run: its later logs fail).
    The fake init behaves as wandb does after a real failed online init (seen with an unreachable
    server): the failed id stays "in use" until wandb.teardown()."""
    real_init, real_teardown = wandb_sink.wandb.init, wandb_sink.wandb.teardown
    held: set[str] = set()

    def init_without_network(**kwargs: object) -> object:
        if kwargs["mode"] == "online":
            held.add(kwargs["id"])
            raise ConnectionError("no route to host")
        if kwargs["id"] in held:
            raise RuntimeError(f"run ID {kwargs['id']} is in use")
        return real_init(**kwargs)

    def teardown() -> None:
        held.clear()
        real_teardown()

    first = WandbSink(project="sae-test", mode="offline", root_dir=wandb_env)
    first.start(name="a", group="g", job_type="activations", config={})
    first.log(1, 10, {"train/loss": 1.0})
    monkeypatch.setattr(wandb_sink.wandb, "init", init_without_network)
    monkeypatch.setattr(wandb_sink.wandb, "teardown", teardown)
    second = WandbSink(project="sae-test", mode="online", root_dir=wandb_env)
    second_id = second.start(name="b", group="g", job_type="activations", config={}, run_id="resumed01")
    second.log(1, 10, {"train/loss": 3.0})
    first.log(2, 20, {"train/loss": 2.0})
    first.finish({})
    second.finish({})

    err = capfd.readouterr().err
    assert "failed" not in err.replace("online init failed", "")  # no W&B call of either run failed
    assert read_offline_run(first.run_dir).values("train/loss") == [1.0, 2.0]
    assert second_id != "resumed01" and second.run_dir.name.endswith(second_id)  # the trainer checkpoints the new id
    assert read_offline_run(second.run_dir).values("train/loss") == [3.0]
    assert f"online init failed: ConnectionError: no route to host; as run {second_id}, since W&B still holds resumed01" in err


def test_mode_from_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_sink._resolve_mode(None) == ("offline", "not logged in to W&B")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    assert wandb_sink._resolve_mode(None) == ("online", "")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_sink._resolve_mode(None) == ("disabled", "")
    assert wandb_sink._resolve_mode("offline") == ("offline", "")


def test_disabled_logs_nothing(wandb_env: Path) -> None:
    sink = WandbSink(mode="disabled", root_dir=wandb_env)
    assert sink.start(name="arm", group="g", job_type="activations", config={"a": 1}) is None
    sink.log(1, 10, {"train/loss": 1.0})
    sink.log_density(1, 10, fake_density(), N_EVAL_TOKENS, 0.1)
    sink.finish({"final/fvu": 0.1})
    assert sink.run_dir is None
    assert not wandb_env.exists()


def test_wandb_error_in_log_is_reported_once(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    sink = WandbSink(project="sae-test", root_dir=wandb_env)
    sink.start(name="arm", group="g", job_type="activations", config={})
    sink.log(1, 10, {"train/loss": 1.0})

    def broken_log(*args: object, **kwargs: object) -> None:
        raise ConnectionError("simulated W&B outage")

    steps_trained = 1
    with monkeypatch.context() as m:
        m.setattr(wandb_sink.wandb.Run, "log", broken_log)
        for step in range(2, 5):
            sink.log(step, step * 10, {"train/loss": 1.0 / step})
            sink.log_density(step, step * 10, fake_density(), N_EVAL_TOKENS, 0.1)
            steps_trained += 1
    sink.finish({"final/fvu": 0.1})

    assert steps_trained == 4
    errors = [line for line in capfd.readouterr().err.splitlines() if "failed" in line]
    assert errors == ["W&B log failed, continuing without W&B for this run: ConnectionError: simulated W&B outage"]
    assert read_offline_run(sink.run_dir).steps("train/loss") == [1]  # logged before the outage, then flushed


def test_metrics_csv_truncate_matches_uninterrupted(tmp_path: Path) -> None:
    def metrics(step: int) -> dict[str, float]:
        return {"train/loss": 0.1 + 0.2 * step, "train/l0": float(step), "eval/kl": math.nan if step == 3 else 1e-9}

    whole = MetricsCSV(tmp_path / "whole" / "metrics.csv")
    for step in range(1, 7):
        whole.append(step, step * 512, metrics(step))

    resumed = MetricsCSV(tmp_path / "resumed" / "metrics.csv")
    for step in range(1, 5):  # crashes after step 4 was logged; checkpoint was at step 2
        resumed.append(step, step * 512, metrics(step))
    resumed.truncate_after(2)
    assert {r["step"] for r in MetricsCSV.read(resumed.path)} == {1, 2}
    for step in range(3, 7):
        resumed.append(step, step * 512, metrics(step))

    assert resumed.path.read_bytes() == whole.path.read_bytes()
    assert list(resumed.path.parent.iterdir()) == [resumed.path]
    rows = MetricsCSV.read(whole.path)
    assert len(rows) == 18 and rows[0] == {"step": 1, "tokens": 512, "name": "train/loss", "value": 0.1 + 0.2}
    assert math.isnan(next(r["value"] for r in rows if r["step"] == 3 and r["name"] == "eval/kl"))


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "state" / "arm.json"
    write_json_atomic(path, {"step": np.int64(7), "ev": np.float32(0.5), "dir": Path("/x"), "curve": np.arange(3)})
    assert read_json(path) == {"step": 7, "ev": 0.5, "dir": "/x", "curve": [0, 1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert read_json(path)["step"] == 7  # a failed write leaves the old file intact...
    assert list(path.parent.iterdir()) == [path]  # ...and no temp file behind


def test_boxed_table_2x2() -> None:
    expected = "\n".join([
        "╔═══════════════╗",
        "║    Results    ║",
        "╟──────┬────────╢",
        "║ arm  │     ev ║",
        "╟──────┼────────╢",
        "║ topk │ 0.9123 ║",
        "║ relu │      — ║",
        "╚══════╧════════╝",
    ])
    assert boxed_table("Results", ["arm", "ev"], [["topk", 0.91234], ["relu", None]]) == expected


def test_boxed_table_long_title_and_bad_rows() -> None:
    lines = boxed_table("a much longer title than the columns", ["n"], [[1234567]]).splitlines()
    assert len({len(line) for line in lines}) == 1  # every line the same width
    assert lines[3] == "║ " + "n".rjust(len(lines[0]) - 4) + " ║"
    with pytest.raises(ValueError):
        boxed_table("t", ["a", "b"], [[1]])


def test_boxed_table_wider_than_100_columns_wraps_headers_and_continues_below() -> None:
    headers = ["arm", *(f"a long metric name number {i}" for i in range(9))]
    rows = [["batchtopk-k32", *(0.123456 * i for i in range(9))], ["relu-l1", *([None] * 9)]]
    lines = boxed_table("Final metrics on the eval split of every arm in the study", headers, rows).splitlines()
    assert max(map(len, lines)) <= 100
    tops = [i for i, line in enumerate(lines) if line.startswith("╔")]
    assert len(tops) >= 2 and "(continued)" in lines[tops[1] + 1] + lines[tops[1] + 2]
    assert sum(line.startswith("║ batchtopk-k32 ") for line in lines) == len(tops)  # the arm column repeats
    text = "\n".join(lines)
    assert all(format_value(0.123456 * i) in text for i in range(9))  # every value is shown
    assert "number" in text and "a long metric name number 1" not in text  # headers wrap onto several lines


def test_wrapped_finding_fits_100_columns() -> None:
    finding = "topk-k32: " + ", ".join(f"category {i} (0.12 single, 0.34 probe)" for i in range(12)) + "."
    lines = wrapped_finding(finding).splitlines()
    assert lines[0].startswith("  - topk-k32:") and all(line.startswith("    ") for line in lines[1:])
    assert max(map(len, lines)) <= 100 and " ".join(line.strip() for line in lines) == "- " + finding


@pytest.mark.parametrize("value, threshold, text", [
    (0.7996, 0.8, "0.7996"), (0.79999, 0.8, "0.7999"), (0.8, 0.8, "0.80"), (0.80004, 0.8, "0.80"),
    (0.805, 0.805, "0.81"), (0.8049, 0.805, "0.80"), (0.123456, 0.8, "0.12"), (0.79, 0.8, "0.79"),
])
def test_values_beside_a_threshold_never_round_across_it(value, threshold, text) -> None:
    assert format_beside(value, threshold) == text
    assert (round_beside(value, threshold) >= threshold) == (value >= threshold)


@pytest.mark.parametrize("value, text", [
    (0.123456, "0.1235"), (123456.7, "1.235e+05"), (1e-7, "1e-07"), (np.float32(0.5), "0.5"),
    (1234567, "1,234,567"), (np.int64(12000), "12,000"), (-5, "-5"), (None, "—"), (True, "True"),
    ("topk", "topk"), (math.nan, "nan"),
])
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text


def test_density_histogram_floor_bar(tmp_path: Path) -> None:
    density = fake_density()
    floor = density_floor(N_EVAL_TOKENS)
    assert floor == pytest.approx(-4.0)
    logd = log10_density(density, N_EVAL_TOKENS)
    assert (logd[:5] == floor).all() and (logd[5:] >= -3).all()

    fig = density_histogram(density, N_EVAL_TOKENS, "topk-k8", 0.1)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("log10 firing frequency", "latents")
    floor_bars = [p for p in ax.patches if p.get_x() < floor < p.get_x() + p.get_width()]
    assert len(floor_bars) == 1 and floor_bars[0].get_height() == 5
    legend = ax.get_legend()
    assert any("never fired" in t.get_text() for t in legend.get_texts())
    assert "dead (never fired): 5" in legend.get_title().get_text()
    assert sum(p.get_height() for p in ax.patches) == N_LATENTS

    save_figure(fig, tmp_path / "density.png")
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def test_progress_bar() -> None:
    bar = progress_bar(total=10, initial=4, desc="topk-k8")
    bar.update(2)
    bar.set_postfix(loss=0.5)
    assert bar.n == 6 and bar.total == 10
    bar.close()


def test_density_histogram_marks_and_counts_the_given_dense_threshold() -> None:
    density = fake_density()
    for threshold in (0.01, 0.3):
        fig = density_histogram(density, N_EVAL_TOKENS, "topk-k8", threshold)
        ax = fig.axes[0]
        marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert marks == [pytest.approx(np.log10(threshold))]
        assert f"of tokens): {int((density > threshold).sum()):,}" in ax.get_legend().get_title().get_text()
        plt.close(fig)


def test_format_timing_leaves_out_phases_under_half_a_second() -> None:
    timing = {"model": 3.2, "harvest": 0.4, "training": 219.75, "report": 0.6, "total": 310.17}
    assert format_timing(timing) == "310 s (model 3 s, training 220 s, report 1 s)"


def test_the_final_sae_artifact_has_its_config_and_no_nan(tmp_path):
    """W&B refuses NaN in an artifact's metadata (and would then drop the run's final summary); a
    metric that is NaN, e.g. cos of an SAE whose latents are all dead, goes as None."""
    class RecordingSink:
        def log_model(self, name, files, metadata, aliases):
            self.logged = (name, files, metadata, aliases)

    arm_dir = tmp_path / "topk-x-1234abcd"
    arm_dir.mkdir()
    (arm_dir / "config.json").write_text('{"architecture": "topk", "k": 8}')
    wandb = RecordingSink()
    ArmSinks(arm_dir, wandb, "topk-x", "study", "activations", {}).log_model(
        arm_dir, 40, 5120, {"cos": float("nan"), "l0": 8.0})
    name, files, metadata, aliases = wandb.logged
    assert name == "sae-topk-x-1234abcd" and aliases == ["final", "step-40"]
    assert [f.name for f in files] == ["sae.safetensors", "config.json"]
    assert metadata["final"] == {"cos": None, "l0": 8.0} and metadata["config"] == {"architecture": "topk", "k": 8}
