"""Target planning: names, suffixes, wildcards, regexes, 'all-linear', excludes; errors before any change."""

import pytest
from torch import nn

from mora_dist import NoMatchingModuleError
from mora_dist.targeting import name_matches, plan_modules_to_save, plan_targets


def _model():
    block = lambda: nn.ModuleDict({"q_proj": nn.Linear(4, 4), "o_proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})  # noqa: E731
    return nn.ModuleDict({"layers": nn.ModuleList([block(), block()]), "lm_head": nn.Linear(4, 8)})


def is_linear(m):
    return isinstance(m, nn.Linear)


@pytest.mark.parametrize(
    ("name", "key", "hit"),
    [("a.b.q_proj", "q_proj", True), ("a.b.xq_proj", "q_proj", False), ("a.1.q", "1.q", True), ("a.1.q", "*.q", True),
     ("layers.0.q", "layers.?.q", True), ("layers.10.q", "layers.?.q", False)],
)
def test_name_matching(name, key, hit):
    assert name_matches(name, key) is hit


def test_all_linear_excludes_head_and_exclude_applies():
    assert plan_targets(_model(), "all-linear", None, is_linear) == [
        "layers.0.q_proj", "layers.0.o_proj", "layers.1.q_proj", "layers.1.o_proj"]
    assert plan_targets(_model(), "all-linear", ["layers.1.*"], is_linear) == ["layers.0.q_proj", "layers.0.o_proj"]


def test_regex_is_a_full_match():
    assert plan_targets(_model(), r"layers\.\d\.q_proj", None, is_linear) == ["layers.0.q_proj", "layers.1.q_proj"]
    with pytest.raises(NoMatchingModuleError, match="regex"):
        plan_targets(_model(), r"q_proj", None, is_linear)


def test_everything_excluded_is_an_error():
    with pytest.raises(NoMatchingModuleError, match="leaves no linear layer"):
        plan_targets(_model(), ["q_proj"], ["q_proj"], is_linear)


def test_modules_to_save_must_match():
    assert plan_modules_to_save(_model(), ["norm"]) == ["layers.0.norm", "layers.1.norm"]
    with pytest.raises(NoMatchingModuleError, match="modules_to_save entry 'embed'"):
        plan_modules_to_save(_model(), ["embed"])
