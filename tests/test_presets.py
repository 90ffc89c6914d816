"""Study presets and --config files: layering, arm sharing between studies, one-line errors."""
import pytest

from config.cli import QUICK_DEFAULTS, parse_args
from config.presets import PRESET_DIR, load_preset, load_source_preset
from config.schema import (SOURCES, STUDY_NAMES, DataConfig, ProbeConfig, SAEArmConfig, SyntheticConfig, TrainConfig,
                           UsageError)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_every_study_and_source_has_a_valid_preset():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted([*STUDY_NAMES, *SOURCES[1:]])
    for name in STUDY_NAMES:
        assert load_preset(name)["description"]
    assert load_source_preset("synthetic")["description"] and load_source_preset("transformer") == {}


def test_default_run_shares_arms_between_studies():
    cfg = parse_args([])
    by_study = {p.name: p.arms for p in cfg.plans}
    # emergence and frequency read exactly the activations arms: nothing is trained twice
    assert by_study["emergence"] == by_study["activations"] == by_study["frequency"]
    assert [a.sae.architecture for a in by_study["activations"]] == ["topk", "batchtopk", "matryoshka", "relu",
                                                                     "jumprelu", "gated"]
    modes = [a.sae.dead_handling for a in by_study["resampling"]]
    assert modes == ["none", "resample", "auxk"]
    resampling = by_study["resampling"][0]
    assert resampling.sae.expansion_factor == 16 and resampling.sae.k == 16 and resampling.train.lr == 0.01
    assert len(cfg.arms) == 9  # 6 shared + 3 resampling arms


def test_layers_preset_then_quick_then_config_then_flags(tmp_path):
    path = write(tmp_path, "train: {lr: 0.002, steps: 50}\nstudies:\n  resampling:\n    train: {lr: 0.01}\n")
    cfg = parse_args(["--quick", "--config", path])
    lr = {p.name: p.arms[0].train.lr for p in cfg.plans}
    # config beats the resampling preset's lr, a study-specific config beats the config's train group
    assert lr == {"activations": 0.002, "emergence": 0.002, "frequency": 0.002, "resampling": 0.01}
    assert cfg.arms[0].train.steps == 50  # config beats --quick
    assert cfg.arms[0].train.batch_size == QUICK_DEFAULTS["batch_size"]  # --quick beats the dataclass default
    flagged = parse_args(["--quick", "--config", path, "--lr", "0.003", "--steps", "9"])
    assert {a.train.lr for a in flagged.arms} == {0.003} and {a.train.steps for a in flagged.arms} == {9}


def test_config_file_groups(tmp_path):
    path = write(tmp_path, """
study: [activations, resampling]
study_id: mine
data: {layer: 1, n_samples: 300}
sae: {k: 16, expansion_factor: 4}
probes: {probe_k: 3}
log: {use_wandb: true, wandb_project: proj}
studies:
  activations: {architectures: [topk, relu], sparsity_sweep: [1, 2]}
  resampling: {dead_handling: [none, auxk]}
""")
    cfg = parse_args(["--config", path])
    assert cfg.study.names == ["activations", "resampling"] and cfg.study.study_id == "mine"
    assert cfg.data.layer == 1 and cfg.data.n_samples == 300 and cfg.probes.probe_k == 3
    assert cfg.log.use_wandb and cfg.log.wandb_project == "proj"
    acts = cfg.plans[0].arms
    assert [(a.sae.architecture, a.sae.k, a.sae.sparsity_coef) for a in acts] == [
        ("topk", 16, 0.0), ("topk", 32, 0.0), ("relu", 32, 0.0065), ("relu", 32, 0.00325)]
    assert all(a.sae.expansion_factor == 4 for a in acts)
    res = cfg.plans[1].arms
    assert [a.sae.dead_handling for a in res] == ["none", "auxk"]
    assert all(a.sae.expansion_factor == 4 for a in res)  # the user's sae group beats the preset's


def test_flags_beat_config_for_architectures_and_study(tmp_path):
    path = write(tmp_path, "study: resampling\nstudies:\n  resampling: {architectures: [relu]}\n")
    cfg = parse_args(["--config", path, "--activation", "batchtopk"])
    assert [a.sae.architecture for a in cfg.arms] == ["batchtopk"] * 3
    assert parse_args(["--config", path, "--study", "activations"]).study.names == ["activations"]
    relu = parse_args(["--config", path])
    assert [a.sae.dead_handling for a in relu.arms] == ["none", "resample"]  # auxk does not apply to relu


@pytest.mark.parametrize("text, fragment", [
    ("train: {lrr: 1}", "train.lrr: unknown setting"),
    ("bogus: 1", "unknown key 'bogus'"),
    ("train: {lr: fast}", "train.lr must be a number"),
    ("train: {steps: 1.5}", "train.steps must be an integer"),
    ("train: {batch_size: 0}", "must be positive"),
    ("train: {lr: -1}", "must be positive"),
    ("train: {dead_window: 0}", "must be positive"),
    ("data: {normalize: maybe}", "must be true or false"),
    ("data: [1, 2]", "must be a mapping"),
    ("sae: {k: 0}", "sae.k must be positive"),
    ("sae: {typo: 1}", "sae.typo: unknown setting"),
    ("studies: {nope: {}}", "studies.nope: unknown study"),
    ("studies: {activations: {architectures: [nope]}}", "unknown architecture 'nope'"),
    ("studies: {activations: {sparsity_sweep: [0]}}", "must be positive"),
    ("studies: {activations: {sparsity_sweep: 2}}", "non-empty list"),
    ("studies: {resampling: {dead_handling: [sometimes]}}", "must list modes"),
    ("studies: {activations: {extra: 1}}", "unknown setting; a study takes"),
    ("study: nope", "unknown study 'nope'"),
    ("- just\n- a list", "must be a mapping"),
    ("train: {lr: [unclosed", "not valid YAML"),
    ("studies: {resampling: {train: {seed: 3}}}", "must be the same for every study"),
    ("studies: {activations: {sae: {dead_handling: auxk}}}\nstudy: activations", "does not apply to relu"),
])
def test_bad_config_files_raise_one_line(tmp_path, text, fragment):
    with pytest.raises(UsageError) as info:
        parse_args(["--config", write(tmp_path, text)])
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("flag, group, cls, name, value, requirement", [
    ("--lr", "train", TrainConfig, "lr", -1, "must be positive, got -1.0"),
    ("--seq-len", "data", DataConfig, "seq_len", 1, "must be >= 2, got 1"),
    ("--layer", "data", DataConfig, "layer", -2, "takes layers (integers >= 0, comma-separated) or all, got '-2'"),
    ("--f1-threshold", "probes", ProbeConfig, "f1_threshold", 1.5, "must be in (0, 1], got 1.5"),
    ("--noise-std", "synthetic", SyntheticConfig, "noise_std", -1, "must be >= 0, got -1.0"),
    ("--k", "sae", SAEArmConfig, "k", 0, "must be positive, got 0"),
    ("--steps", "train", TrainConfig, "steps", 2.5, "must be an integer, got 2.5"),
])
def test_a_bad_value_gets_the_same_message_by_flag_config_file_and_python(tmp_path, capsys, flag, group, cls, name,
                                                                           value, requirement):
    """A setting's range has one home (its dataclass field): the flag, the --config key and the
    dataclass itself all answer with it."""
    with pytest.raises(SystemExit):
        parse_args([flag, str(value)])
    by_flag = capsys.readouterr().err
    with pytest.raises(UsageError) as by_file:
        parse_args(["--config", write(tmp_path, f"{group}: {{{name}: {value}}}")])
    with pytest.raises(UsageError) as by_python:
        cls(**{name: value})
    if name != "steps":
        assert by_flag == f"error: argument {flag}: {requirement} (see --help)\n"
    else:  # a flag's text that does not read as an integer is named as text
        assert by_flag == f"error: argument {flag}: must be an integer, got '2.5' (see --help)\n"
    assert str(by_file.value) == f"{tmp_path / 'cfg.yaml'}: {group}.{name} {requirement}"
    assert str(by_python.value) == f"{cls.__name__}.{name} {requirement}"


def test_an_architecture_section_sets_its_own_dead_latent_handling(tmp_path):
    """sae.<architecture>.dead_handling is that architecture's (it was checked, then ignored); within a
    layer it wins over the shared sae.dead_handling, which still holds for the others."""
    path = write(tmp_path, "sae: {dead_handling: resample, topk: {dead_handling: none}}")
    cfg = parse_args(["--study", "activations", "--activation", "topk,batchtopk,relu", "--config", path])
    assert [(a.sae.architecture, a.sae.dead_handling) for a in cfg.plans[0].arms] == [
        ("topk", "none"), ("batchtopk", "resample"), ("relu", "resample")]
    # and it replaces the resampling study's list of modes, as the shared setting does
    cfg = parse_args(["--study", "resampling", "--config", write(tmp_path, "sae: {topk: {dead_handling: auxk}}")])
    assert [a.sae.dead_handling for a in cfg.plans[0].arms] == ["auxk"]
