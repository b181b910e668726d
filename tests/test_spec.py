"""Sweep-file validation: every bad file is rejected with one message naming the key path,
the bad value and what is allowed; good files resolve with defaults and absolute paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from debias.spec import SpecError, config_hash, load_spec, validate, with_params
from tests.conftest import tiny_sweep, write_sweep


def _set(d: dict, dotted: str, value: object) -> dict:
    d = copy.deepcopy(d)
    node = d
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        node.pop(leaf)
    else:
        node[leaf] = value
    return d


_DELETE = object()

# (dotted key to change, new value, fragments the message must contain)
BAD_CASES = [
    ("method", "dro", ["method", "'dro'", "erm"]),
    ("dataset.name", "imagenet", ["dataset.name", "'imagenet'", "synthetic, waterbirds, celeba"]),
    ("targets", [], ["targets", "non-empty list"]),
    ("targets", ["Odd", "Blond_Hair"], ["targets[1]", "'Blond_Hair'", "Odd"]),
    ("bias_attribute", "Backgroud", ["bias_attribute", "'Backgroud'", "Background"]),
    ("bias_attribute", {"Odd": "Odd", "Loopy": "Background"},
     ["bias_attribute.Odd", "'Odd'", "other than the target"]),
    ("bias_attribute", {"Odd": "Background", "Loopy": "High"},
     ["bias_attribute.Loopy", "'High'", "both digit attributes"]),
    ("seeds", [], ["seeds", "non-empty list of integers"]),
    ("seeds", [0, 0], ["seeds", "distinct"]),
    ("train.epochs", 0, ["train.epochs", "0", "an integer in [1, 10000]"]),
    ("train.epochs", "ten", ["train.epochs", "'ten'", "an integer"]),
    ("train.lr", -1.0, ["train.lr", "-1.0", "a number in (0, 10]"]),
    ("train.optimizer", "rmsprop", ["train.optimizer", "'rmsprop'", "sgd, adam, adamw"]),
    ("train.epoch", 3, ["train.epoch", "unknown key", "did you mean 'epochs'"]),
    ("search.algorithm", "bayes", ["search.algorithm", "'bayes'", "optuna, random, grid"]),
    ("search.metric", "val/acc", ["search.metric", "'val/acc'", "val/worst_group_acc"]),
    ("search.space", {"train.lr": {"float": [0.1, 0.01]}},
     ["search.space.train.lr.float", "[0.1, 0.01]", "lo < hi"]),
    ("search.space", {"train.lr": {"float": [0.1, 0.1]}},
     ["search.space.train.lr.float", "non-empty range"]),
    ("search.space", {"train.lr": {"float": [0.0, 0.1], "log": True}},
     ["search.space.train.lr.float", "a number in (0, 10]"]),
    ("search.space", {"train.batch_size": {"float": [8, 64]}},
     ["search.space.train.batch_size", "{int: [lo, hi]}"]),
    ("search.space", {"train.lrr": {"choice": [0.1]}},
     ["search.space.train.lrr", "not a searchable key", "did you mean 'train.lr'"]),
    ("search.space", {"dataset.image_size": {"choice": [16, 32]}},
     ["search.space.dataset.image_size", "not a searchable key"]),
    ("search.space", {"train.optimizer": {"choice": ["sgd", "lbfgs"]}},
     ["search.space.train.optimizer.choice[1]", "'lbfgs'", "sgd, adam, adamw"]),
    ("resources.cpu", 0, ["resources.cpu", "0", "> 0"]),
    ("resources.gpu", -0.5, ["resources.gpu", "-0.5", ">= 0"]),
    ("backbone.arch", "vit", ["backbone.arch", "'vit'", "resnet50"]),
    ("backbone.weights", "missing.pt", ["backbone.weights", "missing.pt", "looked at"]),
    ("scheduler", {"hyperband": {}}, ["scheduler", "asha"]),
    ("dataset.spurious_correlation", 1.5, ["dataset.spurious_correlation", "1.5", "[0.5, 1.0]"]),
    ("name", "my sweep!", ["name", "'my sweep!'", "letters, digits"]),
    ("max_failures", -1, ["max_failures", "-1", "an integer"]),
    ("search.space", {"train.optimizer": {"choice": ["sgd", "adam"]},
                      "train.momentum": {"float": [0.5, 0.9], "when": {"train.optimizer": "rms"}}},
     ["search.space.train.momentum.when.train.optimizer", "'rms'", "values among"]),
    ("search.space", {"train.momentum": {"float": [0.5, 0.9], "when": {"train.lr": 0.1}}},
     ["search.space.train.momentum.when.train.lr", "a condition on a {choice: [...]} key"]),
    ("search.metric", "val/worst_pseudo_group_acc",
     ["search.metric", "'val/worst_pseudo_group_acc'", "for method erm"]),
    ("clusterfix.k", 0, ["clusterfix.k", "0", "an integer in [1, 1024]"]),
    ("slim.keep_quantile", 1.0, ["slim.keep_quantile", "1.0", "[0, 1)"]),
    ("slim.annotator", "crowd", ["slim.annotator", "'crowd'", "simulated, csv"]),
]


@pytest.mark.parametrize(("key", "value", "fragments"), BAD_CASES,
                         ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_CASES])
def test_bad_sweep_file_names_key_value_and_allowed(tmp_path: Path, key: str, value: object,
                                                    fragments: list[str]) -> None:
    sweep = _set(tiny_sweep(tmp_path), key, value)
    with pytest.raises(SpecError) as err:
        load_spec(write_sweep(tmp_path, sweep), cwd=tmp_path)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"
    assert len(err.value.problems) == 1, message


def test_missing_required_keys_are_all_reported_at_once(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path)
    for key in ("name", "targets", "bias_attribute"):
        sweep.pop(key)
    with pytest.raises(SpecError) as err:
        validate(sweep, cwd=tmp_path)
    problems = " | ".join(err.value.problems)
    assert len(err.value.problems) == 3, problems
    for key in ("name: missing", "targets: missing", "bias_attribute: missing"):
        assert key in problems


def test_unknown_top_level_key_and_real_dataset_without_root(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, dataset={"name": "celeba"}, targets=["Bangs"],
                       bias_attribute="Male", searhc={})
    with pytest.raises(SpecError) as err:
        validate(sweep, cwd=tmp_path)
    text = str(err.value)
    assert "searhc: unknown key (did you mean 'search'?)" in text
    assert "dataset.root: missing" in text


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntargets: [Odd\nmethod: erm\n")
    with pytest.raises(SpecError, match=r"YAML syntax error at line \d+"):
        load_spec(path)


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(path)


def test_bias_map_must_cover_every_target(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, bias_attribute={"Odd": "Background", "High": "Texture"})
    with pytest.raises(SpecError) as err:
        validate(sweep, cwd=tmp_path)
    text = str(err.value)
    assert "['High'] are not in targets" in text
    assert "missing ['Loopy']" in text


def test_grid_needs_choices(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path)
    sweep["search"]["algorithm"] = "grid"
    with pytest.raises(SpecError, match="grid algorithm enumerates choices only"):
        validate(sweep, cwd=tmp_path)


def test_defaults_paths_and_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEBIAS_TEST_STORE", "store")
    sweep = tiny_sweep(tmp_path, storage="${DEBIAS_TEST_STORE}/x", tracking={
        "uri": "sqlite:///${DEBIAS_UNSET_VAR:-rel}.db"})
    sweep["train"] = {"lr": "1e-3"}  # YAML 1.1 reads 1e-3 as a string; we accept it
    spec = validate(sweep, cwd=tmp_path)
    assert spec.config["storage"] == str(tmp_path / "store" / "x")
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'rel.db'}"
    assert spec.config["train"]["lr"] == pytest.approx(1e-3)
    assert spec.config["train"]["epochs"] == 10  # default filled in
    assert spec.config["dataset"]["spurious_correlation"] == 0.95
    assert spec.config["scheduler"] is None


def test_set_overrides_use_dotted_paths_and_yaml_values(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    spec = load_spec(path, ["train.epochs=3", "targets=[High]", "search.space.train.lr="
                            "{float: [0.001, 0.01]}", "bias_attribute=Texture"], cwd=tmp_path)
    assert spec.config["train"]["epochs"] == 3
    assert spec.targets == ["High"]
    assert spec.bias_for("High") == "Texture"
    (lr,) = spec.space
    assert (lr.path, lr.low, lr.high) == ("train.lr", 0.001, 0.01)
    with pytest.raises(SpecError, match=r"train\.epochs: got 0"):
        load_spec(path, ["train.epochs=0"], cwd=tmp_path)
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_spec(path, ["train.epochs"], cwd=tmp_path)


def test_trial_config_and_hash(tmp_path: Path) -> None:
    spec = validate(tiny_sweep(tmp_path), cwd=tmp_path)
    base = spec.trial_base("Loopy")
    assert base["target"] == "Loopy" and base["bias"] == "Background"
    # Search trials train with the search's own seed, never one of the reported seeds.
    assert base["seed"] == spec.search_seed == 1000 and base["seed"] not in spec.seeds
    trial = with_params(base, {"train.lr": 0.02, "seed": 1})
    assert trial["train"]["lr"] == 0.02 and trial["seed"] == 1
    assert base["train"]["lr"] == 0.05  # the base is not mutated
    assert config_hash(trial) == config_hash(copy.deepcopy(trial))
    assert config_hash(trial) != config_hash(base)


def test_shipped_sweep_files_are_valid() -> None:
    sweeps = sorted(Path(__file__).resolve().parents[1].glob("sweeps/*.yaml"))
    assert sweeps, "no sweep files shipped"
    for path in sweeps:
        spec = load_spec(path)
        assert spec.name == path.stem


def test_conditional_space_is_sampled_define_by_run() -> None:
    """A `when` key is suggested only in trials where its condition holds (both branches
    occur), and Optuna sees it only there, so TPE models each branch separately."""
    import optuna

    from debias.search import DefineByRun

    spec = validate({
        "name": "c", "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": {"name": "synthetic"},
        "search": {"algorithm": "optuna", "space": {
            "train.optimizer": {"choice": ["sgd", "adam"]},
            "train.momentum": {"float": [0.5, 0.95], "when": {"train.optimizer": ["sgd"]}},
            "train.lr": {"float": [0.001, 0.1], "log": True}}}})
    assert spec.space[1].when == (("train.optimizer", ("sgd",)),)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(spec.space)
    study.optimize(lambda t: (space(t), 0.0)[1], n_trials=20)
    branches = {t.params["train.optimizer"] for t in study.trials}
    assert branches == {"sgd", "adam"}
    for t in study.trials:
        assert ("train.momentum" in t.params) == (t.params["train.optimizer"] == "sgd")
        assert "train.lr" in t.params
    with pytest.raises(SpecError, match=r"unless search\.algorithm is optuna"):
        validate({**spec.config, "bias_attribute": "Background", "search": {
            "algorithm": "random", "space": {
                "train.optimizer": {"choice": ["sgd", "adam"]},
                "train.momentum": {"float": [0.5, 0.9], "when": {"train.optimizer": "sgd"}}}}})


def test_committed_json_schema_is_current_and_every_sweep_file_points_at_it() -> None:
    """sweeps/sweep.schema.json is `launch.py --schema`'s output: regenerate it with
    `python launch.py --schema > sweeps/sweep.schema.json` when a section changes."""
    import json

    import jsonschema
    import yaml

    from debias.schema import schema_json

    repo = Path(__file__).resolve().parents[1]
    committed = (repo / "sweeps" / "sweep.schema.json").read_text()
    assert committed == schema_json(), "sweeps/sweep.schema.json is stale"
    schema = json.loads(committed)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((repo / "sweeps").glob("*.yaml")):
        assert path.read_text().splitlines()[0] == \
            "# yaml-language-server: $schema=./sweep.schema.json", path.name
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors)
    # The schema rejects what the validator rejects, key by key (a typo, a bad choice).
    bad = {"name": "x", "dataset": {"name": "synthetic"}, "targets": ["Odd"],
           "bias_attribute": "Background", "train": {"epoch": 3, "optimizer": "rmsprop"}}
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "epoch" in messages and "rmsprop" in messages


METHOD_LOAD_CASES = [
    ("no_such_module_xyz:Method", ["method", "cannot import module 'no_such_module_xyz'",
                                   "PYTHONPATH"]),
    ("debias.spec:NoSuchClass", ["method", "has no class 'NoSuchClass'"]),
    ("debias.spec:Spec", ["method", "debias.spec.Spec is not a method"]),
]


@pytest.mark.parametrize(("value", "fragments"), METHOD_LOAD_CASES,
                         ids=[v for v, _ in METHOD_LOAD_CASES])
def test_a_method_that_cannot_be_loaded_is_one_clear_problem(tmp_path: Path, value: str,
                                                             fragments: list[str]) -> None:
    sweep = tiny_sweep(tmp_path, method=value)
    with pytest.raises(SpecError) as err:
        validate(sweep, cwd=tmp_path)
    assert len(err.value.problems) == 1, err.value.problems
    for fragment in fragments:
        assert fragment in str(err.value)


STUDY_CASES = [
    ({"method": "erm", "methods": ["erm", "jtt"]}, ["method, methods: both given"]),
    ({"methods": ["erm", "groupdor"]}, ["methods[1]", "'groupdor'", "did you mean 'groupdro'"]),
    ({"methods": ["erm", "jtt"], "search": {"space": {"clusterfix.k": {"int": [2, 4]}}}},
     ["search.space.clusterfix.k", "method clusterfix, which this sweep does not run"]),
    ({"methods": ["erm", "erm"]}, ["methods", "distinct"]),
]


@pytest.mark.parametrize(("over", "fragments"), STUDY_CASES,
                         ids=[str(f[0])[:40] for _, f in STUDY_CASES])
def test_bad_studies_are_refused_naming_the_key(tmp_path: Path, over: dict,
                                                fragments: list[str]) -> None:
    sweep = tiny_sweep(tmp_path)
    sweep.pop("method")
    sweep.update(over)
    with pytest.raises(SpecError) as err:
        validate(sweep, cwd=tmp_path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_a_study_shares_train_keys_and_keeps_each_methods_own(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, search={"num_samples": 3, "space": {
        "train.lr": {"float": [0.01, 0.1]}, "jtt.lambda_up": {"int": [2, 10]},
        "dfr.retrains": {"int": [1, 4]}}})
    sweep.pop("method")
    sweep["methods"] = ["erm", "jtt", "dfr"]
    spec = validate(sweep, cwd=tmp_path)
    assert spec.is_study and spec.methods == ["erm", "jtt", "dfr"]
    paths = {m: [d.path for d in spec.space_for(m)] for m in spec.methods}
    assert paths == {"erm": ["train.lr"], "jtt": ["train.lr", "jtt.lambda_up"],
                     "dfr": ["dfr.retrains"]}  # a last-layer fit has no SGD to tune
    assert spec.trial_base("Odd", "jtt")["jtt"]["lambda_up"] == 5


def test_seeds_never_include_the_search_seed(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"seeds: got \[0, 1000\]; expected seeds other than "
                                        r"search\.trial_seed \(1000\)"):
        validate(tiny_sweep(tmp_path, seeds=[0, 1000]), cwd=tmp_path)
    spec = validate(tiny_sweep(tmp_path, seeds=[0, 1000],
                               search={"trial_seed": 7}), cwd=tmp_path)
    assert spec.search_seed == 7 and spec.trial_base("Odd")["seed"] == 7


def test_a_validated_sweep_pickles_with_its_typed_file(tmp_path: Path) -> None:
    """The registry-built model exists only once built: a Spec must still pickle (plain
    pickle, as multiprocessing uses) to the same typed file, domains included."""
    import pickle

    spec = validate(tiny_sweep(tmp_path, method="clusterfix", search={
        "space": {"clusterfix.k": {"int": [2, 4]}}}), cwd=tmp_path)
    again = pickle.loads(pickle.dumps(spec))
    assert type(again.file) is type(spec.file) and again.file == spec.file
    assert again.space == spec.space and again.space[0].path == "clusterfix.k"
    assert again.config == spec.config and again.params_of().k == spec.params_of().k


def test_a_dataset_without_its_root_still_checks_the_targets_against_it(tmp_path: Path) -> None:
    """Problems come together: a real dataset missing its root is still the dataset whose
    attributes the targets and the bias are checked against, in the same message."""
    sweep = tiny_sweep(tmp_path, dataset={"name": "celeba"}, targets=["Odd"],
                       bias_attribute="Background")
    with pytest.raises(SpecError) as err:
        validate(sweep, cwd=tmp_path)
    problems = err.value.problems
    assert problems[0].startswith("dataset.root: missing"), problems
    assert any(p.startswith("targets[0]: got 'Odd'; expected an attribute of celeba")
               for p in problems), problems
    assert any(p.startswith("bias_attribute: got 'Background'") for p in problems), problems
