import pytest
import yaml

from bayeslora import ConfigError, DataError, UnknownMethodError
from bayeslora.config import to_plain, train_key
from benchmarks.suite import apply_overrides, load_suite, parse_suite

BASE = {"name": "t", "model": {"name": "tiny", "random_init": {"arch": "llama"}},
        "datasets": ["sst2", {"name": "obqa", "ood": ["arc_easy"]}],
        "methods": ["map", {"name": "map", "label": "map-lr", "train": {"lr": 0.1}}], "seeds": [0, 1],
        "train": {"lr": 0.001}, "lora": {"r": 4}}


def test_expansion_and_method_overrides():
    suite = parse_suite(BASE)
    assert len(suite.runs) == 2 * 2 * 2
    by_label = {r.method.label: r.method_config for r in suite.runs}
    assert by_label["map"].train.lr == 0.001 and by_label["map-lr"].train.lr == 0.1
    assert by_label["map"].lora.r == 4
    assert suite.runs[0].dataset.name == "sst2" and suite.runs[-1].dataset.ood == ["arc_easy"]


def test_per_method_datasets():
    suite = parse_suite({**BASE, "methods": ["map", {"name": "temperature", "datasets": ["obqa"]}]})
    assert {(r.method.label, r.dataset.name) for r in suite.runs if r.seed == 0} == {
        ("map", "sst2"), ("map", "obqa"), ("temperature", "obqa")}
    assert [r.run_id for r in suite.runs if r.method.label == "map"] == [
        r.run_id for r in parse_suite({**BASE, "methods": ["map"]}).runs]


def test_per_method_seeds_and_lora_for_the_trunk_layer():
    raw = {**BASE, "methods": ["map", {"name": "ensemble", "seeds": [0, 5], "config": {"members": 3},
                                       "lora": {"layers": {"top": 2}}}]}
    suite = parse_suite(raw)
    seeds = {(r.method.label, r.dataset.name): [] for r in suite.runs}
    for r in suite.runs:
        seeds[(r.method.label, r.dataset.name)].append(r.seed)
    assert seeds[("map", "sst2")] == [0, 1] and seeds[("ensemble", "sst2")] == [0, 5]
    ens = next(r for r in suite.runs if r.method.label == "ensemble")
    assert ens.lora.layers == {"top": 2} and ens.lora.r == 4 and ens.method_config.members == 3
    # a method's own config overrides the suite's lora too; the trunk layer must follow what it trains
    own = parse_suite({**BASE, "methods": [{"name": "map", "config": {"lora": {"layers": {"top": 2}}}}, "zero_shot"]})
    by_label = {r.method.label: r.lora for r in own.runs}
    assert by_label["map"].layers == {"top": 2} and by_label["zero_shot"].r == 4
    with pytest.raises(ConfigError, match=r"methods\[1\].seeds"):
        parse_suite({**BASE, "methods": ["map", {"name": "map", "label": "m2", "seeds": []}]})


def test_trunk_cache_setting_does_not_change_run_ids():
    off = parse_suite(apply_overrides(BASE, ["model.trunk_cache=off"]))
    assert [r.run_id for r in off.runs] == [r.run_id for r in parse_suite(BASE).runs]


def test_model_holds_the_defaults_of_every_entry_of_models():
    raw = {**BASE, "model": {"max_length": 128, "compile": True, "random_init": {"arch": "llama"}},
           "models": ["tiny", {"name": "tiny-b", "max_length": 64}]}
    models = {r.model.name: r.model for r in parse_suite(raw).runs}
    assert (models["tiny"].max_length, models["tiny-b"].max_length) == (128, 64)
    assert models["tiny"].compile and models["tiny-b"].compile
    assert parse_suite({**BASE, "model": "org/tiny"}).runs[0].model.name == "org/tiny"
    with pytest.raises(ConfigError, match="'model' must be a model name or a mapping"):
        parse_suite({**raw, "model": 3})


def test_run_id_is_stable_and_tracks_config():
    a, b = parse_suite(BASE), parse_suite(BASE)
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    assert len({r.run_id for r in a.runs}) == len(a.runs)
    changed = parse_suite(apply_overrides(BASE, ["data.max_test=5"]))
    assert not {r.run_id for r in changed.runs} & {r.run_id for r in a.runs}
    quiet = parse_suite(apply_overrides(BASE, ["train.progress=false"]))
    assert [r.run_id for r in quiet.runs] == [r.run_id for r in a.runs]


def test_a_later_added_setting_at_its_old_behaviour_default_keeps_run_ids():
    """train.keep came after results existed: at best_val (the old loop) the ids stay what they were,
    for the suite's train settings and for nested ones (vbll's head_train) alike; last changes them."""
    suite = {**BASE, "methods": ["map", "vbll"]}
    ids = [r.run_id for r in parse_suite(suite).runs]
    assert [r.run_id for r in parse_suite(apply_overrides(suite, ["train.keep=best_val"])).runs] == ids
    assert not set(r.run_id for r in parse_suite(apply_overrides(suite, ["train.keep=last"])).runs) & set(ids)
    head = {**suite, "methods": ["map", {"name": "vbll", "config": {"vbll": {"head_train": {"keep": "last"}}}}]}
    assert [r.run_id for r in parse_suite(head).runs if r.method.name == "vbll"][0] not in ids
    plain = to_plain(parse_suite(suite).runs[0].method_config.train)
    assert "keep" not in train_key(plain) and train_key({**plain, "keep": "last"})["keep"] == "last"


@pytest.mark.parametrize("change, error, match", [
    ({"methdos": []}, ConfigError, "unknown top-level suite key"),
    ({"methods": ["laplace_lorra"]}, UnknownMethodError, "Registered methods"),
    ({"datasets": ["sst3"]}, DataError, "Known datasets"),
    ({"train": {"learning_rate": 1}}, ConfigError, "unknown key.*learning_rate.*valid keys"),
    ({"seeds": "0"}, ConfigError, "seeds must be a list"),
    ({"methods": ["map", "map"]}, ConfigError, "labels must be unique"),
    ({"methods": [{"name": "zero_shot", "train": {"lr": 1}}]}, ConfigError, "has no train settings"),
    ({"num_samples": 0}, ConfigError, "num_samples"),
    ({"methods": [{"name": "map", "datasets": ["boolq"]}]}, ConfigError, "does not have"),
    ({"methods": [{"name": "map", "datasets": "sst2"}]}, ConfigError, "list of dataset names"),
])
def test_bad_suites_fail_clearly(change, error, match):
    with pytest.raises(error, match=match):
        parse_suite({**BASE, **change})


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_suite(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_suite(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="key=value"):
        load_suite(good, ["data.max_test"])
    assert load_suite(good, ["seeds=[3]"]).runs[0].seed == 3


def test_numbers_written_without_a_dot_are_numbers():
    # YAML 1.1 reads 3e-3 as a string; the settings builder turns it into the field's number type
    suite = parse_suite(apply_overrides(BASE, ["train.lr=3e-3", "train.batch_size=4"]))
    train = [r.method_config.train for r in suite.runs if hasattr(r.method_config, "train")][0]
    assert train.lr == 0.003 and isinstance(train.lr, float) and train.batch_size == 4
    with pytest.raises(ConfigError, match=r"train.*\.lr must be a number"):
        parse_suite(apply_overrides(BASE, ["train.lr=fast"]))
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        parse_suite(apply_overrides(BASE, ["train.batch_size=2.5e0"]))


def test_shipped_suites_parse():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/suites/*.yaml")):
        suite = load_suite(path)
        assert suite.runs, path
    qwen = load_suite(Path(__file__).parents[1] / "configs/suites/commonsense-qwen2.5-7b.yaml")
    assert {r.dataset.name for r in qwen.runs} == {"arc_easy", "arc_challenge", "obqa", "wg_s", "wg_m", "boolq"}
    assert all(r.num_samples == 10 and r.model.name == "Qwen/Qwen2.5-7B" for r in qwen.runs)
