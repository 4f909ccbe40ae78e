"""MoRAConfig: type names and numbers, and errors that name the field, the value and the fix."""

import pytest

from mora_dist import MoRAConfig, MoRAConfigError


@pytest.mark.parametrize(
    ("value", "number"),
    [(1, 1), ("sharing", 1), ("sharing_block", 2), ("mixed_block", 3), ("mixed_stride", 4), ("rope", 6), ("6", 6)],
)
def test_type_names_and_numbers(value, number):
    assert MoRAConfig(mora_type=value, target_modules=["q"]).mora_type == number


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mora_type": 5}, r"mora_type=5 is not a MoRA type; use one of 1, 2, 3, 4, 6"),
        ({"mora_type": "lowrank"}, r"mora_type='lowrank'"),
        ({"r": 0}, r"r=0 must be a positive integer"),
        ({"r_hat": 31, "mora_type": 6}, r"r_hat=31 is odd.*r_hat such as 32"),
        ({"dropout": 1.5}, r"dropout=1.5"),
        ({"mora_dtype": "int8"}, r"mora_dtype='int8'"),
        ({"target_modules": None}, r"target_modules=None.*all-linear"),
        ({"target_modules": "q_proj("}, r"target_modules='q_proj\(' is not a valid regex"),
        ({"tensor_parallel_sharding": "split"}, r"tensor_parallel_sharding='split'"),
        ({"tensor_parallel_grad_sync": "never"}, r"tensor_parallel_grad_sync='never'.*'backward'.*'step'"),
    ],
)
def test_bad_values_name_field_value_and_fix(kwargs, message):
    values = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(MoRAConfigError, match=message):
        MoRAConfig(**values)


def test_dict_round_trip_and_unknown_fields():
    config = MoRAConfig(r=16, mora_type="sharing", target_modules="all-linear", modules_to_save=["lm_head"])
    assert MoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(MoRAConfigError, match=r"unknown MoRAConfig field\(s\) \['rank'\]"):
        MoRAConfig.from_dict({"rank": 8, "target_modules": ["q"]})
