"""MHRConfig: validation collects every problem, dict round trip, target matching."""

import math

import pytest

from mhr import ConfigError, MHRConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_skills", 0),
        ("n_skills", 2.0),
        ("n_heads", -1),
        ("n_heads", True),
        ("rank", 0),
        ("rank", "4"),
        ("alpha", 0.0),
        ("alpha", -1.0),
        ("alpha", math.inf),
        ("alpha", math.nan),
        ("alpha", "1"),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("dropout", None),
        ("temperature", 0.0),
        ("temperature", math.nan),
        ("init", "xavier"),
        ("target_modules", []),
        ("target_modules", 5),
        ("target_modules", ["q_proj", ""]),
        ("target_modules", ["q_proj", 3]),
        ("target_modules", "(unclosed"),
    ],
)
def test_each_invalid_field_is_named(field, value):
    with pytest.raises(ConfigError) as info:
        MHRConfig(**{field: value})
    message = str(info.value)
    assert field in message
    # Only the bad field is reported: one problem line under the header.
    assert len(message.splitlines()) == 2, message


def test_every_invalid_field_is_listed_in_one_message():
    bad = dict(n_skills=0, n_heads=0, rank=-2, alpha=0, dropout=2.0, temperature=-1.0, init="?",
               target_modules=[])
    with pytest.raises(ConfigError) as info:
        MHRConfig(**bad)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == len(bad)
    for field in bad:
        assert sum(line.strip().startswith(field) for line in lines) == 1, (field, lines)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        MHRConfig(rank=0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.(q|v)_proj", ("q_proj",)])
def test_dict_round_trip(targets):
    config = MHRConfig(n_skills=3, n_heads=2, rank=5, alpha=2.5, dropout=0.1, target_modules=targets,
                       relaxed_routing=False, temperature=0.5, init="kaiming")
    data = config.to_dict()
    assert data == {
        "n_skills": 3, "n_heads": 2, "rank": 5, "alpha": 2.5, "dropout": 0.1,
        "target_modules": list(targets) if isinstance(targets, tuple) else targets,
        "relaxed_routing": False, "temperature": 0.5, "init": "kaiming",
    }
    assert MHRConfig.from_dict(data) == config


def test_from_dict_rejects_unknown_keys():
    data = MHRConfig().to_dict() | {"n_splits": 4, "lr": 1e-3}
    with pytest.raises(ConfigError) as info:
        MHRConfig.from_dict(data)
    assert "n_splits" in str(info.value) and "lr" in str(info.value)


def test_from_dict_validates_values():
    with pytest.raises(ConfigError, match="rank"):
        MHRConfig.from_dict(MHRConfig().to_dict() | {"rank": 0})


def test_scaling_is_alpha_over_rank():
    assert MHRConfig(alpha=3.0, rank=4).scaling == 0.75


@pytest.mark.parametrize(
    "targets, name, expected",
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["q_proj"], "q_proj", True),
        (["q_proj"], "model.layers.0.self_attn.qq_proj", False),  # a suffix must follow a dot
        (["self_attn.q_proj"], "model.layers.1.self_attn.q_proj", True),
        (["q"], "model.layers.0.self_attn.q_proj", False),
        (r"model\.layers\.0\..*_proj", "model.layers.0.mlp.up_proj", True),
        (r"model\.layers\.0\..*_proj", "model.layers.1.mlp.up_proj", False),
        (r"q_proj", "model.layers.0.self_attn.q_proj", False),  # a regex must match the full name
    ],
)
def test_matches(targets, name, expected):
    assert MHRConfig(target_modules=targets).matches(name) is expected


def test_unmatched_targets():
    names = ["a.q_proj", "a.v_proj"]
    assert MHRConfig(target_modules=["q_proj", "o_proj", "x"]).unmatched_targets(names) == ["o_proj", "x"]
    assert MHRConfig(target_modules=r".*\.k_proj").unmatched_targets(names) == [r".*\.k_proj"]
    assert MHRConfig(target_modules=r".*_proj").unmatched_targets(names) == []
