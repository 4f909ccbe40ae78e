"""The Hugging Face quickstart example runs and its adapter and merged exports reproduce the trained logits."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_hf_quickstart_round_trips(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_quickstart", EXAMPLES / "hf_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--out", str(tmp_path), "--steps", "12"])
    assert result["final_loss"] < result["first_loss"] - 0.2
    assert result["reloaded_adapter"] < 1e-5
    assert result["merged_export"] < 1e-4
