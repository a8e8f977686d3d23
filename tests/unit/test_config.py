"""Config loading, overrides and error messages that name the field and what is allowed."""

from pathlib import Path

import pytest

from raymoe.config import ConfigError, RaymoeConfig, describe_fields, load_config, moe_layer_ids

CONFIGS = sorted((Path(__file__).parents[2] / "cluster_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    data_keys = set(RaymoeConfig.model_fields)
    import yaml

    raw = yaml.safe_load(path.read_text())
    if set(raw) <= data_keys:  # raymoe configs (Serve / cluster launcher YAMLs have other roots)
        load_config(path)


def test_overrides_apply_with_yaml_types():
    cfg = load_config(None, ["train.steps=7", "moe.num_experts=[4, 8]", "moe.noisy_gate_policy=null",
                             "model.dropout=0.1"])
    assert cfg.train.steps == 7 and cfg.moe.num_experts == [4, 8] and cfg.model.dropout == 0.1
    assert moe_layer_ids(cfg) == [1, 3]


def test_moe_layers_explicit_and_interval():
    assert moe_layer_ids(load_config(None, ["moe.moe_layers=[0, 1]"])) == [0, 1]
    assert moe_layer_ids(load_config(None, ["model.n_layer=6", "moe.expert_interval=3"])) == [2, 5]


@pytest.mark.parametrize("override, expected", [
    ("model.n_head=5", "model.n_head=5 must divide model.d_model=128"),
    ("moe.noisy_gate_policy=Gauss", "moe.noisy_gate_policy: Input should be 'Jitter' or 'RSample'"),
    ("train.lr=-1", "train.lr: Input should be greater than 0 (got -1)"),
    ("moe.num_experts=[4]", "moe.num_experts has 1 entries but the schedule has 2 MoE layers [1, 3]"),
    ("moe.k=9", "moe.k=9 must be <= the smallest num_experts (8)"),
    ("moe.moe_layers=[7]", "moe.moe_layers [7] out of range: allowed 0..3"),
    ("train.micro_batch_size=3", "train.micro_batch_size=3 must divide train.global_batch_size=16"),
    ("train.device=tpu", "train.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("moe.num_experts=0", "moe.num_experts: num_experts must be an int >= 1"),
])
def test_bad_values_name_field_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_unknown_fields_are_rejected_with_allowed_list(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field 'stepz' under train; allowed: steps, "):
        load_config(None, ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train.stepz: unknown field"):
        load_config(bad)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expects dotted.path=value"):
        load_config(None, ["train.steps"])


def test_every_field_has_a_description():
    rows = describe_fields()
    assert len(rows) > 40
    assert all(desc for _, _, desc in rows), [p for p, _, d in rows if not d]


def test_docs_config_md_is_current(capsys):
    from raymoe.cli import main

    assert main(["config", "--fields", "--markdown"]) == 0
    doc = Path(__file__).parents[2] / "docs" / "config.md"
    assert doc.read_text() == capsys.readouterr().out, "regenerate: raymoe config --fields --markdown > docs/config.md"


def test_config_to_dict_round_trips_values_and_what_was_set(tmp_path):
    from raymoe.config import config_from_dict, config_to_dict

    cfg = load_config(None, ["model.n_layer=3", "moe.aux_loss_coef=0.01", "run.name=x", "cluster.mode=ray",
                             "cluster.num_workers=2", "train.global_batch_size=8"])
    cfg.run.output_dir = str(tmp_path)  # as the driver makes it absolute
    back = config_from_dict(config_to_dict(cfg))
    assert back == cfg
    assert "aux_loss_coef" in back.moe.model_fields_set and "k" not in back.moe.model_fields_set
    assert back.run.output_dir == str(tmp_path)
