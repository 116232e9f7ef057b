import pytest
import yaml

from multifusion.core.config import ConfigError, config_from_dict, load_config


def test_params_yaml_loads(repo_root):
    cfg = load_config(repo_root / "params.yaml")
    assert cfg.data.split.train + cfg.data.split.val + cfg.data.split.test == pytest.approx(1.0)


def test_override_and_unknown_keys(repo_root, make_config):
    assert make_config({"hnf.layers": 4}).hnf.layers == 4
    with pytest.raises(ConfigError, match="no such key"):
        make_config({"hnf.nope": 1})
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["hnf"]["typo"] = 1
    with pytest.raises(ConfigError, match="unknown key 'hnf.typo'"):
        config_from_dict(raw)
    del raw["hnf"]["typo"], raw["graph"]["k"]
    with pytest.raises(ConfigError, match="missing key 'graph.k'"):
        config_from_dict(raw)
    raw["graph"]["k"] = "eight"
    with pytest.raises(ConfigError, match="graph.k' must be an integer"):
        config_from_dict(raw)
