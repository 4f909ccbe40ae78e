"""Reading and writing every copy of a parameter and its moments under ZeRO 0-3 (real engines, 2 ranks, gloo)."""

import torch

from tests.helpers.workers import run_workers
from tests.integration.test_training_remora import LR, _build_engine, _init, _module_value, _train_step


def _roundtrip_worker(cases):
    from mora_dist.model import mora_layers
    from mora_dist.training.optimizer_state import deepspeed as zero_state

    rank = _init()
    out = {}
    for stage, bf16, persistence in cases:
        engine = _build_engine(stage=stage, bf16=bf16, persistence=persistence)
        for step in (1, 2):
            _train_step(engine, step, rank)
        opt = engine.optimizer
        layers = [layer for _, layer in mora_layers(engine.module)]
        g = torch.Generator().manual_seed(5)
        written = {}
        for i, layer in enumerate(layers):
            M = layer.mora_M
            value = torch.randn(tuple(getattr(M, "ds_shape", M.shape)), generator=g) * 0.05
            zero_state.set_full(opt, M, value)
            for key in zero_state.state_keys(opt, M):
                zero_state.set_full(opt, M, torch.full_like(value, 0.25) if key == "exp_avg_sq" else -value, key)
            written[i] = value
        r = {"sizes": sorted({layer.mora_M.ds_numel if zero_state.is_zero3(layer.mora_M) else layer.mora_M.numel()
                              for layer in layers})}
        r["master_err"] = max(float((zero_state.get_full(opt, layer.mora_M) - written[i]).abs().max())
                              for i, layer in enumerate(layers))
        r["module_err"] = max(float((_module_value(layer.mora_M) - written[i]).abs().max())
                              for i, layer in enumerate(layers))
        r["avg_err"] = max(float((zero_state.get_full(opt, layer.mora_M, "exp_avg") + written[i]).abs().max())
                           for i, layer in enumerate(layers))
        r["sq_err"] = max(float((zero_state.get_full(opt, layer.mora_M, "exp_avg_sq") - 0.25).abs().max())
                          for layer in layers)
        for i, layer in enumerate(layers):
            for key in zero_state.state_keys(opt, layer.mora_M):
                zero_state.set_full(opt, layer.mora_M, torch.zeros_like(written[i]), key)
        r["fraction"] = zero_state.zeroed_fraction(opt, [layer.mora_M for layer in layers])
        _train_step(engine, 3, rank)
        r["step_move"] = max(float((zero_state.get_full(opt, layer.mora_M) - written[i]).abs().max())
                             for i, layer in enumerate(layers))
        out[f"zero{stage}-{'bf16' if bf16 else 'fp32'}-persist{persistence}"] = r
    return out


def test_set_full_writes_module_master_and_moments_and_survives_a_step():
    """A full value written through zero_state reads back from the fp32 master and the module copy, moments too,
    and the next step starts from it (moves each entry by at most lr from zero moments). Catches writes to the
    module copy only (undone at the next step at stages 1-3), and wrong ZeRO-3 slicing of matrices whose size is
    not divisible by the world size (289 = 17 x 17 here), which DeepSpeed's safe_set_full_* cannot write."""
    cases = [(0, True, None), (1, False, None), (2, True, None), (3, False, None), (3, True, 0)]
    results = run_workers(_roundtrip_worker, 2, cases)
    for rank_result in results:
        for name, r in rank_result.items():
            bf16 = "bf16" in name
            assert any(n % 2 for n in r["sizes"]), r["sizes"]
            assert r["master_err"] <= (1e-3 if bf16 else 0.0), (name, r)
            assert r["module_err"] <= (1e-3 if bf16 else 0.0), (name, r)
            assert r["avg_err"] == 0.0 and r["sq_err"] == 0.0, (name, r)
            assert r["fraction"] == 1.0, (name, r)
            assert 0 < r["step_move"] <= LR * 1.001, (name, r)
    assert results[0] == results[1]
