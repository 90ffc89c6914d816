"""Weights & Biases sink for SAE training arms. The only module in the harness that imports wandb.

W&B trouble never stops training: every wandb call is guarded, the first failure of a run is
reported in one line on stderr, and the run then continues without W&B (init retries offline first).
"""

import netrc
import os
import secrets
import string
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import matplotlib.pyplot as plt
import numpy as np
import wandb

from visualization.plots import density_floor, density_histogram, log10_density
from visualization.study_plots import umap_scatter

DEFAULT_HOST = "https://api.wandb.ai"
HIST_BINS = 64
ONLINE_INIT_TIMEOUT_S = 30.0  # wandb's default of 90 s is a long stall per arm when the network is down
# wandb-core writes the run's .wandb log every 15 s by default, so a SIGKILLed run loses up to 15 s of
# history; flush every second instead (an experimental setting, so only where this wandb has it).
_FLUSH_KEY = "x_transaction_log_flush_interval"
_FLUSH_SETTING = {_FLUSH_KEY: 1.0} if _FLUSH_KEY in wandb.Settings.model_fields else {}


def _logged_in() -> bool:
    """Whether wandb would find credentials (env var or netrc), decided locally so no network is touched."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def _resolve_mode(mode: str | None) -> tuple[str, str]:
    """The W&B mode to use, and why it is offline when nobody asked for offline."""
    if mode := mode or os.environ.get("WANDB_MODE"):
        return mode, ""
    return ("online", "") if _logged_in() else ("offline", "not logged in to W&B")


def _new_run_id() -> str:
    # Same shape as wandb's own ids (8 chars, lowercase alphanumerics).
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _cell(value):
    """Table cells: numbers, strings and None (a missing value) as they are, anything else as text."""
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


# Runs this process has open (arms in lockstep each hold one). wandb.teardown() would end them all.
_open_runs: set[str] = set()


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


class WandbSink:
    def __init__(
        self, project: str = "sae-interpretability", mode: str | None = None, root_dir: Path | None = None,
        after_log: Callable[[], None] | None = None,
    ) -> None:
        self.project = project
        self.mode = mode
        self.root_dir = Path(root_dir) if root_dir is not None else None
        self.after_log = after_log  # called after every log call (the runner's fault-injection point)
        self._run: wandb.Run | None = None
        self._run_dir: Path | None = None
        self._failed = False  # a wandb call of the current run raised: make no more calls for it
        # Shared with for_another_run: after one failed online init, later runs go straight to offline;
        # the offline notice is printed once, and one `wandb sync` command uploads every offline run.
        self._shared = {"online_failed": False, "offline_dirs": []}

    def for_another_run(self) -> "WandbSink":
        """A sink for one more run, open at the same time as this one's (arms training in lockstep);
        it shares what this one learned about reaching W&B online."""
        other = WandbSink(self.project, self.mode, self.root_dir, self.after_log)
        other._shared = self._shared
        return other

    @property
    def run_dir(self) -> Path | None:
        """Local folder of the latest run (…/wandb/offline-run-<time>-<id> or run-<time>-<id>); kept after finish."""
        return self._run_dir

    def _init(self, mode: str, *, run_id: str, resume: str | None, name: str, group: str, job_type: str,
              config: dict) -> wandb.Run:
        if self.root_dir is not None:
            self.root_dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=self.project,
            name=name,
            group=group,
            job_type=job_type,
            config=config,
            id=run_id,
            resume=resume,
            mode=mode,
            dir=str(self.root_dir) if self.root_dir is not None else None,
            reinit="create_new",  # arms in lockstep each have a run open at the same time
            settings=wandb.Settings(
                silent=mode == "offline",  # our notice and sync command replace wandb's banner and hint at finish
                init_timeout=ONLINE_INIT_TIMEOUT_S,
                **_FLUSH_SETTING,
            ),
        )

    def _fail(self, where: str, exc: BaseException) -> None:
        if not self._failed:
            msg = f"W&B {where} failed, continuing without W&B for this run: {_one_line(exc)}"
            print(msg, file=sys.stderr, flush=True)
        self._failed = True

    def start(self, *, name: str, group: str, job_type: str, config: dict, run_id: str | None = None) -> str | None:
        """Open (or resume, given the id from a checkpoint) a run; returns its id, None when disabled."""
        mode, why_offline = _resolve_mode(self.mode)
        self._run, self._run_dir, self._failed = None, None, False
        if mode == "disabled":
            return None
        if mode == "online" and self._shared["online_failed"]:  # don't wait out the init timeout again for every arm
            mode, why_offline = "offline", "online init failed earlier in this process"
        # The id is fixed up front so an offline fallback keeps the id the trainer checkpoints (but see below).
        args = dict(run_id=run_id or _new_run_id(), resume="allow" if run_id else None,
                    name=name, group=group, job_type=job_type, config=config)
        try:
            run = self._init(mode, **args)
        except Exception as exc:
            if mode == "offline":
                self._fail("init", exc)
                return args["run_id"]
            self._shared["online_failed"], why_offline = True, f"online init failed: {_one_line(exc)}"
            # The failed online run still holds its id in wandb's service process. Tearing the
            # service down frees it, but would also end the runs other arms have open; then this
            # run takes a fresh id instead (returned, so the trainer checkpoints that one).
            try:
                if _open_runs:
                    held, args["run_id"] = args["run_id"], _new_run_id()
                    why_offline += f"; as run {args['run_id']}, since W&B still holds {held}"
                else:
                    wandb.teardown()
                run = self._init("offline", **args)
            except Exception as exc:
                self._fail("offline init", exc)
                return args["run_id"]
        self._run = run
        _open_runs.add(run.id)
        try:
            self._run_dir = Path(run.settings.sync_dir)
            run.define_metric("tokens")
            for prefix in ("train", "eval", "density", "concepts", "freq", "umap"):
                run.define_metric(f"{prefix}/*", step_metric="tokens")
            if run.offline:
                offline = self._shared["offline_dirs"]
                if not offline:
                    why = f" ({why_offline})" if why_offline else ""
                    print(f"W&B logging offline{why}, under {self._run_dir.parent}", file=sys.stderr, flush=True)
                if self._run_dir not in offline:
                    offline.append(self._run_dir)
        except Exception as exc:
            self._fail("setup", exc)
        return run.id

    def log(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        if self._run is None or self._failed:
            return
        try:
            self._run.log({**metrics, "tokens": tokens}, step=step)
        except Exception as exc:
            self._fail("log", exc)
        if self.after_log is not None:
            self.after_log()

    def log_density(self, step: int, tokens: int, density: np.ndarray, n_tokens: int, dense_threshold: float) -> None:
        """Log10 firing-frequency histogram (never-fired latents at log10(1/n_tokens) - 1) and its plot,
        with the dense threshold that eval/dense_frac used."""
        if self._run is None or self._failed:
            return
        fig = density_histogram(density, n_tokens, f"{self._run.name} · step {step:,}", dense_threshold)
        try:
            # Fixed range so the floor bin holds exactly the never-fired latents and evals share bins.
            floor = density_floor(n_tokens)
            hist = np.histogram(log10_density(density, n_tokens), bins=HIST_BINS, range=(floor, 0.0))
            self._run.log(
                {"density/hist": wandb.Histogram(np_histogram=hist), "density/plot": wandb.Image(fig), "tokens": tokens},
                step=step,
            )
        except Exception as exc:
            self._fail("log_density", exc)
        finally:
            plt.close(fig)

    def log_embedding(self, step: int, tokens: int, xy: np.ndarray, log10_freq: np.ndarray,
                      concept: list[str | None]) -> None:
        """UMAP of decoder directions: a table (one row per latent), a scatter of it and an image
        with both colourings (matched concept, log10 frequency)."""
        if self._run is None or self._failed:
            return
        fig = umap_scatter(xy, concept, log10_freq, title=f"{self._run.name} · decoder directions, step {step:,}")
        try:
            table = wandb.Table(columns=["latent", "x", "y", "log10_frequency", "concept"],
                                data=[[i, float(x), float(y), float(f), c or "unmatched"]
                                      for i, ((x, y), f, c) in enumerate(zip(xy, log10_freq, concept))])
            self._run.log({"umap/table": table,
                           "umap/scatter": wandb.plot.scatter(table, "x", "y", title=f"UMAP of decoder directions, step {step:,}"),
                           "umap/image": wandb.Image(fig), "tokens": tokens}, step=step)
        except Exception as exc:
            self._fail("log_embedding", exc)
        finally:
            plt.close(fig)

    def log_model(self, name: str, files: list[Path], metadata: dict, aliases: list[str]) -> None:
        """Files as a version of the W&B artifact `name`, of type "model" (W&B makes no new version
        when the content is unchanged, so a resumed arm that logs the same files again adds none).
        Offline, the run's file records the artifact and its files wait in WANDB_DATA_DIR's staging
        folder for `wandb sync`."""
        if self._run is None or self._failed:
            return
        try:
            artifact = wandb.Artifact(name, type="model", metadata=metadata)
            for path in files:
                artifact.add_file(str(path))
            self._run.log_artifact(artifact, aliases=aliases)
        except Exception as exc:
            self._fail("log_model", exc)

    def log_summary_run(self, *, name: str, group: str, config: dict, tables: dict[str, tuple[list[str], list[list]]],
                        figures: dict, run_id: str | None = None) -> str | None:
        """One run (job type `summary`) holding a study's comparison tables and plots; given the
        id of an earlier attempt's run (a resumed study), that run is continued."""
        run_id = self.start(name=name, group=group, job_type="summary", config=config, run_id=run_id)
        if self._run is not None and not self._failed:
            try:
                payload = {f"tables/{key}": wandb.Table(columns=headers, data=[[_cell(v) for v in row] for row in rows])
                           for key, (headers, rows) in tables.items()}
                payload.update({f"plots/{key}": wandb.Image(fig) for key, fig in figures.items()})
                self._run.log(payload)
            except Exception as exc:
                self._fail("log_summary_run", exc)
        self.finish({})
        return run_id

    @property
    def offline_dirs(self) -> list[Path]:
        """The folders of every run this sink and its siblings logged offline."""
        return self._shared["offline_dirs"]

    def sync_command(self) -> str | None:
        """One shell command (continued over lines of at most 100 columns) that uploads every run
        this sink and its siblings logged offline; None when there were none."""
        dirs = self._shared["offline_dirs"]
        if not dirs:
            return None
        return " \\\n    ".join(["wandb sync", *map(str, dirs)])

    def finish(self, summary: dict[str, float]) -> None:
        """Write final metrics (e.g. "final/explained_variance") to the run summary and close the run."""
        run, self._run = self._run, None
        if run is None:
            return
        _open_runs.discard(run.id)
        try:
            if not self._failed:
                run.summary.update(summary)
            run.finish()  # even after a failure, so what was logged gets flushed
        except Exception as exc:
            self._fail("finish", exc)
