"""Every shipped config validates, for the world size it is meant for (torchtune ``tests/recipes/test_configs.py``)."""

import json
from pathlib import Path

import pytest

from mora_dist.run.config import check_world, validate_run_config

CONFIGS = sorted(Path("configs").glob("*.json"))
# World sizes each config is meant for; paths of user corpora/checkpoints are not on the test machine.
WORLDS = {"remora_tiny": 2, "remora_tiny_moe": 2, "remora_tiny_megatron_tp2": 2, "remora_250m_megatron_tp2": 8,
          "remora_tiny_megatron_moe": 2}


def test_the_configs_the_issue_names_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"remora_tiny", "remora_250m", "remora_1b", "mora_cpt_biomed", "mora_cpt_finance",
            "remora_250m_megatron_tp2"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    cfg = validate_run_config(json.loads(path.read_text()), check_paths=path.stem.startswith("remora_tiny"))
    accum = check_world(cfg, WORLDS.get(path.stem, 8))
    assert accum >= 1
    if path.stem.startswith("remora_") and not path.stem.startswith("remora_tiny"):
        assert cfg.method == "remora" and cfg.data.seq_len == 512 and cfg.mora.r == 128
        assert cfg.remora.merge_every == 2000
    if path.stem.startswith("mora_cpt_"):
        assert cfg.method == "mora" and cfg.model.pretrained and len(cfg.data.sources) == 2


def test_paper_shapes():
    shapes = {stem: json.loads(Path(f"configs/{stem}.json").read_text())["model"]
              for stem in ("remora_250m", "remora_1b", "remora_250m_megatron_tp2")}
    for stem in ("remora_250m", "remora_250m_megatron_tp2"):
        m = shapes[stem]
        assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["intermediate_size"]) == (768, 24, 16, 2560)
    m = shapes["remora_1b"]
    assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["intermediate_size"]) == (2048, 24, 32, 5461)
    assert shapes["remora_250m_megatron_tp2"]["tensor_model_parallel_size"] == 2
