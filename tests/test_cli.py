"""Flag -> config mapping and one-line validation errors (no model needed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.cli import QUICK_DEFAULTS, parse_args
from config.schema import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, hooks", [
    ([], ["blocks.0.hook_resid_post"]),
    (["--layer", "1"], ["blocks.1.hook_resid_post"]),
    (["--hook", "mlp_out"], ["blocks.0.hook_mlp_out"]),
    (["--hook-point", "blocks.1.hook_resid_mid", "--layer", "0"], ["blocks.1.hook_resid_mid"]),
    (["--layer", "1,0,1"], ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]),
    (["--layer", "all", "--hook", "resid_mid,mlp_out"],
     ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"]),
    (["--hook-point", "blocks.0.hook_resid_mid, blocks.1.hook_mlp_out"], ["blocks.0.hook_resid_mid",
                                                                          "blocks.1.hook_mlp_out"]),
])
def test_hook_points_of_a_model_with_two_layers(argv, hooks):
    assert parse_args(argv).data.hook_names(2) == hooks


def test_one_hook_point_keeps_the_stored_form_of_its_settings():
    """A study of one hook point records layer and hook as single values, as before several were
    possible, so that its settings (and --resume's match against them) read the same."""
    data = parse_args(["--layer", "1", "--hook", "mlp_out"]).result_spec()["data"]
    assert (data["layer"], data["hook"], data["hook_point"]) == (1, "mlp_out", None)


def test_a_config_file_lists_layers_and_hooks_as_yaml_lists(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  layer: [0, 2]\n  hook: [resid_mid]\n")
    assert parse_args(["--config", str(config)]).data.hook_names(3) == ["blocks.0.hook_resid_mid",
                                                                         "blocks.2.hook_resid_mid"]
    config.write_text("data:\n  layer: [0, two]\n")
    with pytest.raises(UsageError, match="takes layers .* got 'two'"):
        parse_args(["--config", str(config)])


def test_defaults():
    cfg = parse_args([])
    assert cfg.data.model_name == "tinylm" and cfg.data.hook_names(2) == ["blocks.0.hook_resid_post"]
    assert cfg.study.names == ["activations", "emergence", "frequency", "resampling"] and cfg.study.label == "all"
    sae = cfg.arms[0].sae
    assert sae.architecture == "topk" and sae.dead_handling == "auxk" and sae.k == 32
    assert cfg.data.normalize and not cfg.log.use_wandb


@pytest.mark.parametrize("argv, path, expected", [
    (["--hidden-dim", "300"], "arms.0.sae.hidden_dim", 300),
    (["--expansion-factor", "4"], "arms.0.sae.expansion_factor", 4),
    (["--k", "16"], "arms.0.sae.k", 16),
    (["--lr", "3e-4"], "train.lr", 3e-4),
    (["--epochs", "3"], "train.epochs", 3),
    (["--steps", "77"], "train.steps", 77),
    (["--batch-size", "256"], "train.batch_size", 256),
    (["--seed", "5"], "train.seed", 5),
    (["--layer", "1"], "data.layer", 1),
    (["--layer", "all"], "data.layer", "all"),
    (["--layer", "1,0,1"], "data.layer", [1, 0]),
    (["--hook", "mlp_out"], "data.hook", "mlp_out"),
    (["--hook", "mlp_out,resid_mid"], "data.hook", ["mlp_out", "resid_mid"]),
    (["--n-samples", "100"], "data.n_samples", 100),
    (["--seq-len", "20"], "data.seq_len", 20),
    (["--model-name", "gpt2"], "data.model_name", "gpt2"),
    (["--no-normalize"], "data.normalize", False),
    (["--normalize-activations"], "data.normalize", True),
    (["--no-dead-resample"], "arms.0.sae.dead_handling", "none"),
    (["--dead-resample"], "arms.0.sae.dead_handling", "auxk"),
    (["--dead-handling", "none"], "arms.0.sae.dead_handling", "none"),
    (["--aux-k", "8"], "arms.0.sae.aux_k", 8),
    (["--activation", "matryoshka", "--matryoshka-levels", "3"], "arms.0.sae.matryoshka_levels", 3),
    (["--activation", "relu", "--dead-resample"], "arms.0.sae.dead_handling", "resample"),
    (["--activation", "relu"], "arms.0.sae.dead_handling", "none"),
    (["--dead-window", "4096"], "train.dead_window", 4096),
    (["--use-wandb"], "log.use_wandb", True),
    (["--wandb-mode", "offline"], "log.use_wandb", True),
    (["--wandb-project", "p"], "log.wandb_project", "p"),
    (["--checkpoint-dir", "/tmp/x"], "log.checkpoint_dir", "/tmp/x"),
    (["--study-id", "mine"], "study.study_id", "mine"),
    (["--resume"], "study.resume", True),
    (["--study", "activations"], "study.names", ["activations"]),
    (["--study", "resampling,emergence"], "study.names", ["emergence", "resampling"]),
    (["--study", "all"], "study.label", "all"),
    (["--report", "s1"], "study.report", "s1"),
    (["--probe-k", "4"], "probes.probe_k", 4),
    (["--f1-threshold", "0.6"], "probes.f1_threshold", 0.6),
    (["--study", "activations", "--sparsity-sweep", "0.5,2"], "arms.1.sae.k", 64),
    (["--activation", "topk"], "arms.0.sae.architecture", "topk"),
    (["--activation", "jump_relu"], "arms.0.sae.architecture", "jumprelu"),
    (["--activation", "relu", "--l1-coefficient", "0.2"], "arms.0.sae.sparsity_coef", 0.2),
    (["--activation", "gated", "--l1-coefficient", "0.3"], "arms.0.sae.sparsity_coef", 0.3),
    (["--activation", "jumprelu", "--l0-coefficient", "0.01"], "arms.0.sae.sparsity_coef", 0.01),
    (["--activation", "jumprelu", "--target-l0", "20"], "arms.0.sae.target_l0", 20.0),
    (["--activation", "jumprelu"], "arms.0.sae.dead_handling", "none"),  # as SAELens and dictionary_learning
    (["--activation", "jumprelu", "--dead-resample"], "arms.0.sae.dead_handling", "resample"),
    (["--activation", "relu", "--no-dead-resample"], "arms.0.sae.dead_handling", "none"),
    (["--activation", "topk", "--dead-handling", "resample"], "arms.0.sae.dead_handling", "resample"),
    (["--activation", "gated"], "arms.0.sae.aux_coef", 1.0),
    (["--dataset", "f.txt"], "data.dataset", "f.txt"),
    (["--no-progress"], "log.progress", False),
    ([], "study.parallel_arms", 2),
    (["--parallel-arms", "1"], "study.parallel_arms", 1),
    ([], "train.dtype", "float32"),
    (["--dtype", "bfloat16"], "train.dtype", "bfloat16"),
    (["--dtype", "bfloat16"], "arms.0.train.dtype", "bfloat16"),
])
def test_flag_sets_its_field(argv, path, expected):
    obj = parse_args(["--study", "activations", *argv] if "--study" not in argv else argv)
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    assert obj == expected


def test_several_architectures_and_all():
    cfg = parse_args(["--study", "activations", "--activation", "relu,topk,jump_relu,topk"])
    assert [a.sae.architecture for a in cfg.arms] == ["relu", "topk", "jumprelu"]
    everything = parse_args(["--study", "activations", "--activation", "all", "--k", "16", "--l1-coefficient", "0.2"])
    by_arch = {a.sae.architecture: a.sae for a in everything.arms}
    assert set(by_arch) == {"relu", "jumprelu", "topk", "batchtopk", "matryoshka", "gated"}
    # each option reaches only the architectures it applies to
    assert by_arch["topk"].k == by_arch["batchtopk"].k == by_arch["matryoshka"].k == 16
    assert by_arch["relu"].sparsity_coef == 0.2
    assert by_arch["gated"].sparsity_coef == 0.2 and by_arch["jumprelu"].sparsity_coef != 0.2
    assert by_arch["topk"].dead_handling == "auxk" and by_arch["relu"].dead_handling == "none"
    assert all(a.sae.dead_handling == "none" for a in parse_args(["--activation", "all", "--no-dead-resample"]).arms)


def test_quick_changes_defaults_but_explicit_flags_win():
    q = parse_args(["--quick"])
    assert q.train.steps == QUICK_DEFAULTS["steps"] and q.data.n_samples == QUICK_DEFAULTS["n_samples"]
    assert parse_args(["--quick", "--steps", "7"]).train.steps == 7
    assert q.probes.umap_evals == 1 and parse_args([]).probes.umap_evals == 3


def test_entry_point_exits_2_with_one_line_and_no_traceback():
    out = subprocess.run([sys.executable, "run_experiments.py", "--k", "64", "--hidden-dim", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ")


def test_the_entry_point_exits_with_mains_code_after_every_exit_handler(tmp_path):
    """run_experiments.py skips Python's finalisation (exit_without_teardown: no object is freed one
    by one), not the exit handlers, those registered before it ran included, nor what it printed;
    and not at all under a profiler."""
    code = f"""
import atexit, runpy, sys, types
class Finalised:
    def __del__(self):
        print("finalised", flush=True)
sys.modules["held"] = types.ModuleType("held")
sys.modules["held"].value = Finalised()  # freed by Python's finalisation, if it runs
atexit.register(lambda: print("handler ran", flush=True))
sys.argv = ["run_experiments.py", "--report", "absent", "--checkpoint-dir", {str(tmp_path)!r}]
runpy.run_path("run_experiments.py", run_name="__main__")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stdout == "handler ran\n" and out.stderr.startswith("error: --report: there is no study 'absent'")
    # Under a profiler (cProfile, pyinstrument) the exit is Python's own: they report after the script.
    profiled = code.replace("atexit.register", "sys.setprofile(lambda *args: None); atexit.register")
    out = subprocess.run([sys.executable, "-c", profiled], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "handler ran\nfinalised\n"


def test_help_explains_every_flag_with_its_default():
    out = subprocess.run([sys.executable, "run_experiments.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ["--hidden-dim", "--lr", "--epochs", "--batch-size", "--activation", "--model-name", "--layer",
                 "--n-samples", "--seq-len", "--use-wandb", "--normalize-activations", "--no-normalize",
                 "--dead-resample", "--no-dead-resample", "--dead-window", "--aux-k", "--matryoshka-levels", "--resume", "--study", "--quick",
                 "--steps", "--seed", "--checkpoint-dir", "--study-id", "--hook", "--hook-point", "--k",
                 "--expansion-factor", "--wandb-project", "--wandb-mode"]:
        assert flag in out.stdout, flag
    assert out.stdout.count("default") >= 20


@pytest.mark.parametrize("content, fragment", [("{not json", "is not valid JSON"),
                                               ('{"study_id": "x"}', "is not a study record")])
def test_report_of_a_broken_study_record_exits_2_in_one_line(tmp_path, capsys, content, fragment):
    from run_experiments import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(content)
    assert main(["--report", "s", "--checkpoint-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.strip().count("\n") == 0


def test_the_harness_imports_from_outside_the_repository(tmp_path):
    """`pip install -e .` (the Makefile's) puts the packages on the path of the venv's Python, so a
    script in any folder can use them, reading this checkout's code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ("import config.cli, experiments.studies.runner, models.sae, visualization.report; "
              "print(models.sae.SAE.__module__, models.sae.__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    module, path = out.stdout.split()
    assert module == "models.sae.base" and Path(path).is_relative_to(Path(__file__).resolve().parents[1])


def test_every_flag_of_a_setting_takes_its_help_and_default_from_the_field_table():
    import dataclasses

    from config.cli import build_parser
    from config.schema import DataConfig, LogConfig, ProbeConfig, SAEArmConfig, StudyConfig, SyntheticConfig, TrainConfig

    text = build_parser().format_help()
    shown, squeezed = " ".join(text.split()), "".join(text.split())  # argparse wraps lines, also at hyphens
    described = [(cls, f) for cls in (DataConfig, SyntheticConfig, SAEArmConfig, TrainConfig, ProbeConfig, LogConfig,
                                      StudyConfig) for f in dataclasses.fields(cls) if f.metadata.get("help")]
    assert len(described) >= 30
    for cls, f in described:
        flag = "--" + f.name.replace("_", "-")
        assert f"{flag} " in shown, flag
        assert "".join(f.metadata["help"].split()) in squeezed, flag
    assert "seedfordataorder,SAEinitandeverythingelse(default:0)" in squeezed
    assert "(default:262,144;--quick:16,384)" in squeezed  # --dead-window
