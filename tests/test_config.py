from pathlib import Path

import pytest

from odyssey.config import (
    TrainConfig,
    apply_overrides,
    from_dict,
    load_model_config,
    load_train_config,
    parse_bytes,
)
from odyssey.errors import OdysseyError
from odyssey.modelconfig import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in ALL_YAML}
    assert {"nano.yaml", "small.yaml", "odyssey-1.2b.yaml", "lora.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_loads_strictly(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    if "hidden_size" in data:
        cfg = load_model_config(path)
        assert cfg.num_parameters() > 0
        # one-to-one with HF config.json keys
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    else:
        load_train_config(path)
    # an unknown key is rejected wherever the file is
    bad = dict(data, not_a_key=1)
    with pytest.raises(OdysseyError, match="unknown config key not_a_key"):
        from_dict(ModelConfig if "hidden_size" in data else TrainConfig, bad)


def test_parameter_counts():
    nano = load_model_config(ROOT / "configs/nano.yaml").num_parameters()
    small = load_model_config(ROOT / "configs/small.yaml").num_parameters()
    big = load_model_config(ROOT / "configs/odyssey-1.2b.yaml").num_parameters()
    assert 2e6 <= nano <= 6e6
    assert 80e6 <= small <= 130e6
    assert 1.15e9 <= big <= 1.25e9


def test_model_config_errors():
    with pytest.raises(OdysseyError, match="must divide hidden_size"):
        ModelConfig(vocab_size=10, hidden_size=100, intermediate_size=8, num_hidden_layers=1, num_attention_heads=3)
    with pytest.raises(OdysseyError, match="num_key_value_heads"):
        ModelConfig(
            vocab_size=10,
            hidden_size=64,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=3,
        )
    with pytest.raises(OdysseyError, match="hidden_size must be of type int"):
        from_dict(
            ModelConfig,
            dict(vocab_size=10, hidden_size="big", intermediate_size=8, num_hidden_layers=1, num_attention_heads=4),
        )


def test_hf_v4_and_v5_rope_keys():
    base = dict(
        vocab_size=10,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        model_type="llama",
        torch_dtype="float32",
    )
    v4 = ModelConfig.from_hf_dict(dict(base, rope_theta=500000.0))
    v5 = ModelConfig.from_hf_dict(dict(base, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}))
    assert v4.rope_theta == v5.rope_theta == 500000.0
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama3["original_max_position_embeddings"] = 8192
    v4s = ModelConfig.from_hf_dict(dict(base, rope_theta=500000.0, rope_scaling=llama3))
    v5s = ModelConfig.from_hf_dict(dict(base, rope_parameters={"rope_theta": 500000.0, **llama3}))
    assert v4s == v5s and v4s.rope_scaling == llama3 and v4s.rope_theta == 500000.0
    # a RoPE that is not implemented, or one missing a parameter, is refused naming it
    with pytest.raises(OdysseyError, match="RoPE type 'yarn' is not supported"):
        ModelConfig.from_hf_dict(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(OdysseyError, match="RoPE type llama3 needs high_freq_factor"):
        ModelConfig.from_hf_dict(dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_train_config_overrides():
    cfg = load_train_config(
        ROOT / "configs/lora.yaml", ["lora.r=32", "lr=1e-4", "guard.max_temp_c=85", "lora.targets=q_proj,v_proj"]
    )
    assert cfg.lora.r == 32 and cfg.lr == 1e-4 and cfg.guard.max_temp_c == 85.0
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    with pytest.raises(OdysseyError, match="unknown config key lora.rank"):
        load_train_config(ROOT / "configs/lora.yaml", ["lora.rank=8"])
    with pytest.raises(OdysseyError, match="lora.r must be of type int"):
        load_train_config(None, ["lora.r=abc"])
    with pytest.raises(OdysseyError, match="key=value"):
        apply_overrides({}, ["oops"])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1.5GiB", int(1.5 * 2**30)),
        ("1500MiB", 1500 * 2**20),
        ("2G", 2 * 2**30),
        ("2GB", 2 * 2**30),
        ("512m", 512 * 2**20),
        ("1048576", 2**20),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(OdysseyError, match="--ram-budget"):
        parse_bytes(text)


MODEL_KEYS = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("head_dim", 0, "head_dim must be > 0"),
        ("head_dim", -8, "head_dim must be > 0"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number"),
        ("rms_norm_eps", 0.0, "rms_norm_eps must be > 0"),
        ("rope_theta", float("inf"), "rope_theta must be a finite number"),
        ("rope_theta", -1.0, "rope_theta must be > 0"),
        ("initializer_range", -0.1, "initializer_range must be >= 0"),
        ("vocab_size", 0, "vocab_size must be > 0"),
    ],
)
def test_impossible_model_numbers_are_one_line(key, value, needle):
    with pytest.raises(OdysseyError) as e:
        from_dict(ModelConfig, {**MODEL_KEYS, key: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("weight_decay=-1", "weight_decay must be >= 0"),
        ("max_grad_norm=-0.5", "max_grad_norm must be >= 0"),
        ("min_lr_ratio=1.5", "min_lr_ratio must be in [0, 1]"),
        ("lr=.nan", "lr must be a finite number"),
        ("lr=-1e-4", "lr must be > 0"),
        ("dist_timeout_s=0", "dist_timeout_s must be > 0"),
        ("lora.dropout=.inf", "lora.dropout must be a finite number"),
        ("guard.interval_s=.nan", "guard.interval_s must be a finite number"),
        ("slots=0", "slots must be > 0"),
        ("lora.r=0", "lora.r must be > 0"),
    ],
)
def test_impossible_training_numbers_are_one_line(override, needle):
    with pytest.raises(OdysseyError) as e:
        load_train_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
