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
