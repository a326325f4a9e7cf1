"""Named sets of method knobs: `paper` (the reference engine as the DeltaKV paper ran it) and
`latest` (the reference's latest engine / its HF path). Every difference from our defaults is a
named option of the method's config; a preset only flips them (`LLM(path, method=m, **preset(name, m))`,
or `deltakv-eval ... +preset=paper`, whose YAML (conf/preset/) tests/test_paper_preset.py checks
against these dicts).

References (read with `fetch`; the rules are cited in the config docstrings):
  paper : CURRENTF/Sparse-vLLM@0975d3f (src/sparsevllm/engine/sparse_controller.py, cache_manager.py,
          model_runner.py, config.py, triton_kernel/context_flashattention_nopad.py)
  latest: CURRENTF/Sparse-vLLM@18d3104 (src/sparsevllm/engine/sparse_controller.py)

Not here: the compressor-side rules are properties of the trained checkpoint, which the engine
reads and cannot override at serving time. They are set when training (the reference's values in
conf/experiment/qwen7b_c512.yaml / llama8b_c512.yaml): `ReferenceSpec.stride_rounding="floor"`,
`ReferenceSpec.l2_softmax_score="distance"`, `ReferenceSpec.cluster_on="k"`, `CompressorConfig.up="mlp_gelu"`.
The latent format is the one serving knob among them: `latent_dtype="int4_asym"` (the reference's
asymmetric grouped int4) where a run wants it; it is a memory choice, so the presets leave it alone.
"""

from __future__ import annotations

# OmniKV's reference defaults (config.py: num_sink_tokens 64, num_recent_tokens 512, num_top_tokens
# 4096, full_attn_layers "0"); the recent window counts the current token at decode.
_OMNIKV_REFERENCE = dict(sink_size=64, recent_size=512, num_top_tokens=4096, num_top_tokens_in_prefill=None,
                         full_attn_layers=[0], recent_includes_current=True)

PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "deltakv": dict(score_mode="raw_qk", prefill_select="always", select_candidates="compressed",
                        proto_grid="per_block", exact_window="blocks", prefill_compress="incremental"),
        "omnikv": dict(score_mode="raw_qk", prefill_select="long_prompt", **_OMNIKV_REFERENCE),
    },
    "latest": {
        "deltakv": dict(score_mode="softmax_candidates", prefill_select="never", select_candidates="compressed",
                        proto_grid="per_block", exact_window="blocks", prefill_compress="incremental"),
        "omnikv": dict(score_mode="softmax_candidates", prefill_select="never", **_OMNIKV_REFERENCE),
    },
}


def preset(name: str, method: str) -> dict:
    """The knobs preset `name` sets for `method` ({} for a method it does not touch)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name].get(method, {}))
