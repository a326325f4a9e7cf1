"""experiments/method_table (issue 15.8): per-method overrides of the paper tables, DeltaKV skipped
with a reason when no compressor is given, kv_budget only where a method has a budget knob."""

from __future__ import annotations

import json

import pytest

from experiments.method_table import command_flags, has_budget_knob, table_methods


def test_deltakv_without_a_compressor_is_skipped_with_a_reason(capsys):
    methods, per_method, notes = table_methods("vanilla,snapkv,deltakv")
    assert methods == ["vanilla", "snapkv"] and per_method == {}
    assert "deltakv skipped" in notes[0] and "--deltakv_path" in notes[0]
    assert "deltakv skipped" in capsys.readouterr().out


def test_deltakv_path_and_method_overrides_go_to_their_method_only(tmp_path):
    (tmp_path / "compressor_config.json").write_text(json.dumps({}))
    methods, per_method, notes = table_methods("vanilla,kivi,deltakv", str(tmp_path), "kivi:method.bits=2")
    assert methods == ["vanilla", "kivi", "deltakv"] and notes == []
    assert per_method == {"kivi": ["method.bits=2"], "deltakv": [f"method.deltakv_path={tmp_path}"]}
    flags = command_flags("vanilla,kivi,deltakv", str(tmp_path), "kivi:method.bits=2")
    assert flags == f" --methods vanilla,kivi,deltakv --deltakv_path {tmp_path} --method_overrides 'kivi:method.bits=2'"
    with pytest.raises(FileNotFoundError, match="compressor_config.json"):
        table_methods("deltakv", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="method:key=value"):
        table_methods("kivi", None, "kivi-bits-2")


def test_kv_budget_only_for_methods_with_a_budget_knob():
    assert not has_budget_knob("vanilla") and not has_budget_knob("kivi")
    assert has_budget_knob("snapkv") and has_budget_knob("deltakv") and has_budget_knob("streaming")


def test_a_failing_method_is_a_line_and_the_other_rows_are_written(tmp_path, monkeypatch):
    from experiments import method_table as mt

    seen = {}

    def fake_run_eval(ov):
        method = next(o.split("=", 1)[1] for o in ov if o.startswith("method="))
        seen[method] = ov
        if method == "snapkv":
            raise TypeError("Unknown config key 'x' for method 'snapkv'")
        return {"label": f"{method}-0", "method": method, "backend": "engine", "knobs": {}, "query_mode": "aware",
                "model": "m", "n_records": 2, "wall_s": 1.0, "kv_stats": {"bytes_per_token": 10},
                "result": {"scores": {"acc": 50.0}, "average": 50.0, "kv": {"kv_fraction_mean": 0.5, "kv_bytes_mean": 7}}}

    monkeypatch.setattr(mt.er, "compose", lambda ov: ov)
    monkeypatch.setattr(mt.er, "run_eval", fake_run_eval)
    out = tmp_path / "t.md"
    text = mt.run_methods_table("niah", ["benchmark.x=1"], ["vanilla", "snapkv", "kivi"], kv_budget=64,
                                method_overrides={"kivi": ["method.bits=2"]}, results_root=str(tmp_path / "r"),
                                out_md=out, title="T", command="cmd")
    assert out.read_text() == text
    assert "| vanilla-0 | engine | vanilla |" in text and "| kivi-0 | engine | kivi |" in text
    assert "snapkv failed: TypeError: Unknown config key 'x'" in text
    assert "kv_budget not applied to kivi" in text
    # per-method overrides reach only their method; kv_budget only methods with a budget knob
    assert "method.bits=2" in seen["kivi"] and "method.bits=2" not in seen["vanilla"]
    assert "kv_budget=64" in seen["snapkv"] and not any(o.startswith("kv_budget") for o in seen["kivi"] + seen["vanilla"])


def test_default_methods_are_the_registry():
    from benchmark.eval_runner import ALL_METHODS
    from experiments.method_table import DEFAULT_METHODS

    # every registered method but sparsex (no budget knob, differs from vanilla only with reusable segments)
    assert set(DEFAULT_METHODS) == set(ALL_METHODS) - {"sparsex"} and DEFAULT_METHODS[:3] == ("vanilla", "deltakv", "kivi")
