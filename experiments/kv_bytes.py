"""KV bytes per token of a DeltaKV recipe, counted part by part as the paper counts them (issue 15.4).

    python -m experiments.kv_bytes +experiment=qwen7b_c512
    python -m experiments.kv_bytes +experiment=qwen7b_c512 method.full_layer_kv_quant_bits=0 context=32768

Composes `conf/train.yaml` with the given Hydra overrides (the recipe: model, compressor geometry)
plus `conf/method/deltakv.yaml` (serving knobs; `method.*` overrides), the model's shape from its
local config (`model.path`, else `benchmark/configs/<model>/config.json`). Counts, for a sequence of
`context` tokens right after its prefill (the engine's rules: sinks + every stride-th prototype +
the last `recent_size` tokens exact in sparse layers, the rest latent rows; full layers every token
or, with `full_layer_kv_quant_bits`, KIVI blocks of whole groups beyond sinks + a residual window):

    latents     compressed tokens x latent payload (sparse layers)
    scales      int8/int4 latents' per-token scale; KIVI's fp16 min / scale (full layers)
    prototypes  sparse layers' exact prototype tokens (sinks excluded)
    full layers every token in bf16, or KIVI codes
    window      exact sinks + recent window (sparse layers), sinks + KIVI residual tail (full layers)
    index       father prototype ids stored with each latent row
and the ratio to a bf16 vanilla cache. `storage` adds what this engine spends on top when KIVI blocks
sit in pool slots (15 payload bits per 16-bit word, whole slots), so `engine total` is what
`LLM.kv_stats()` reports for the same sequence (checked in tests/test_kv_bytes.py).

Serving knobs default to the reference's memory configuration (int4 latents, KIVI int4 full layers:
CURRENTF/Sparse-vLLM `docs/en/features/deltakv.md`, `full_layer_kv_quant_bits: 4`, groups of 32, a
residual of 32); any `method.<knob>=...` overrides them. Extra keys: `context=N` (default 131072),
`slot_bytes=N` (bytes of one token of one KV head at full precision; default bf16: 4 x head_dim),
`out=PATH` (also write the report as markdown).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERVING = dict(latent_dtype="int4", full_layer_kv_quant_bits=4, full_layer_kivi_group_size=32,
                       full_layer_kivi_residual_length=32)
EXTRA_KEYS = ("context", "slot_bytes", "out")


@dataclass
class Geometry:
    """What the count needs: model shape, compressor geometry, serving knobs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    full_layers: list[int]
    latent_size: int
    sinks: int
    stride: int
    top_k: int
    latent_dtype: str = "int4"
    recent_size: int = 32
    kivi_bits: int = 0
    kivi_group: int = 32
    kivi_residual: int = 32

    @property
    def sparse_layers(self) -> int:
        return self.num_layers - len(self.full_layers)


def count(g: Geometry, context: int, slot_bytes: int) -> dict:
    """Bytes per part for one sequence of `context` tokens after prefill (see the module docstring)."""
    from sparse_engine.cache.kivi_quant import KiviCodec, finite_words
    from sparse_engine.offload.latent_store import LatentCodec

    T, H, S = context, g.num_kv_heads, g.sinks
    ordinal_max = S + (g.max_positions - S) // max(g.stride, 1) if g.stride else g.max_positions
    codec = LatentCodec(g.latent_size, g.latent_dtype, g.top_k, 2 if ordinal_max < 2**15 - 1 else 4)
    # sparse layers: compressed = non-prototype positions in [sinks, T - recent)
    boundary = T - g.recent_size
    upto = boundary if boundary > S else S
    protos_hist = (-(-(upto - S) // g.stride) if g.stride else 0) if upto > S else 0  # (p - S) % stride == 0
    compressed = max(0, upto - S - protos_hist)
    exact_sparse = T - compressed
    window_sparse = exact_sparse - protos_hist  # sinks + the recent tokens (prototypes among them included)
    Ls, Lf = g.sparse_layers, len(g.full_layers)
    parts = dict.fromkeys(("latents", "scales", "prototypes", "full layers", "window", "index"), 0)
    parts["latents"] = Ls * compressed * codec.payload_bytes
    parts["scales"] = Ls * compressed * codec.scale_bytes
    parts["index"] = Ls * compressed * codec.num_fathers * codec.father_bytes
    parts["prototypes"] = Ls * protos_hist * H * slot_bytes
    parts["window"] = Ls * window_sparse * H * slot_bytes
    storage = 0
    if g.kivi_bits:
        kc = KiviCodec(H, g.head_dim, g.kivi_bits, g.kivi_group)
        quant = max(0, T - min(S, T) - g.kivi_residual) // g.kivi_group * g.kivi_group if T > S else 0
        blocks = quant // g.kivi_group
        parts["full layers"] = Lf * blocks * 2 * kc.code_bytes
        parts["scales"] += Lf * blocks * (kc.key_meta_bytes + kc.value_meta_bytes)
        parts["window"] += Lf * (T - quant) * H * slot_bytes
        per_block = -(-2 * finite_words(kc.block_bytes) // slot_bytes) * slot_bytes
        storage = Lf * blocks * (per_block - kc.block_bytes)
    else:
        parts["full layers"] = Lf * T * H * slot_bytes
    total = sum(parts.values())
    vanilla = g.num_layers * T * H * slot_bytes
    return dict(parts=parts, total=total, vanilla=vanilla, ratio=total / vanilla, storage=storage,
                engine_total=total + storage, compressed=compressed, prototypes=protos_hist, row_bytes=codec.row_bytes)


# ---------------------------------------------------------------------------------------------- config
def _split(argv):
    extra, overrides = {}, []
    for a in argv:
        k = a.split("=", 1)[0]
        if k in EXTRA_KEYS:
            extra[k] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    return extra, overrides


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    import yaml

    if not any(o.lstrip("+~").startswith("method=") for o in overrides):
        overrides = ["+method=deltakv"] + overrides
    known = set(yaml.safe_load((REPO / "conf" / "method" / "deltakv.yaml").read_text()))
    # serving knobs the method yaml does not list (e.g. full_layer_kv_quant_bits) are added, not overridden
    overrides = [("+" + o if o.startswith("method.") and o.split("=", 1)[0].split(".", 1)[1] not in known else o)
                 for o in overrides]
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return hcompose("train", overrides=overrides, return_hydra_config=True)


def model_dir(cfg) -> Path:
    """The model's config folder: model.path when it holds a config.json, else benchmark/configs/<name>
    (the model group's name without its variant suffix: qwen2_5_7b_1m -> qwen2_5_7b)."""
    from data_prepare.resources import resolve_model_path

    path = cfg.model.get("path")
    if path and path != "???":
        try:
            p = resolve_model_path(path)
            if (p / "config.json").is_file():
                return p
        except Exception:  # noqa: BLE001 - not local: fall back to the shipped shapes
            pass
    name = str(cfg.hydra.runtime.choices.get("model"))
    parts = name.split("_")
    for n in range(len(parts), 0, -1):
        d = REPO / "benchmark" / "configs" / "_".join(parts[:n])
        if (d / "config.json").is_file():
            return d
    raise SystemExit(f"no local config for model '{name}': give model.path=<folder with config.json>")


def serving_full_layers(cfg, method: dict) -> list[int]:
    """Full layers at serving: method.full_attn_layers, else the model group's own list (conf/model/<name>:
    the layers the reference serves full, e.g. Qwen2.5-7B 0,1,2,4,7,14 - an experiment may train with
    another, e.g. qwen7b_c512 compresses every layer in training), else the compressor's / model's."""
    import yaml

    if method.get("full_attn_layers"):
        return list(method["full_attn_layers"])
    f = REPO / "conf" / "model" / f"{cfg.hydra.runtime.choices.get('model')}.yaml"
    if f.is_file():
        own = yaml.safe_load(f.read_text()).get("full_attn_layers")
        if own:
            return list(own)
    return list(cfg.compressor.get("full_attn_layers") or cfg.model.get("full_attn_layers") or [])


def geometry(cfg, overrides: list[str] = ()) -> Geometry:
    from deltakv.reference import ReferenceSpec
    from sparse_engine.models.spec import ModelSpec
    from omegaconf import OmegaConf

    spec = ModelSpec.from_pretrained(model_dir(cfg))
    comp, m = cfg.compressor, OmegaConf.to_container(cfg.method, resolve=True)
    knobs = {**DEFAULT_SERVING, **{k: v for k, v in m.items() if k in DEFAULT_SERVING or k == "recent_size"}}
    overridden = {o.split("=", 1)[0].split(".", 1)[1] for o in overrides if o.lstrip("+").startswith("method.")}
    for k in DEFAULT_SERVING:  # the yaml's defaults yield to the reference's memory setting, explicit overrides win
        if k not in overridden:
            knobs[k] = DEFAULT_SERVING[k]
    ref = ReferenceSpec.from_dict(OmegaConf.to_container(comp.reference, resolve=True))
    full = serving_full_layers(cfg, m)
    return Geometry(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings, sorted(set(full) | {0}),
                    int(comp.kv_compressed_size), ref.num_sinks, ref.stride, ref.top_k if ref.kind == "cluster_e2e" else 0,
                    str(knobs["latent_dtype"]), int(knobs.get("recent_size", 32)), int(knobs["full_layer_kv_quant_bits"]),
                    int(knobs["full_layer_kivi_group_size"]), int(knobs["full_layer_kivi_residual_length"]))


def report(g: Geometry, context: int, slot_bytes: int, command: str) -> str:
    c = count(g, context, slot_bytes)
    T = context
    lines = [f"# KV bytes per token: DeltaKV as the paper counts them", "", f"Command: `{command}`", "",
             f"Model: {g.num_layers} layers, {g.num_kv_heads} KV heads x {g.head_dim} (slot {slot_bytes} B per token "
             f"and KV head), full layers {g.full_layers}; latent {g.latent_size} ({g.latent_dtype}, row "
             f"{c['row_bytes']} B incl. scale + {g.top_k} father ids), sinks {g.sinks}, prototype stride {g.stride}, "
             f"recent {g.recent_size}; full layers: "
             + (f"KIVI int{g.kivi_bits}, groups of {g.kivi_group}, residual {g.kivi_residual}" if g.kivi_bits
                else "full precision") + f". Context {T:,} tokens, right after prefill.", "",
             "| part | bytes / token | share of bf16 vanilla |", "|---|---|---|"]
    for k, v in c["parts"].items():
        lines.append(f"| {k} | {v / T:,.1f} | {100 * v / c['vanilla']:.2f}% |")
    lines.append(f"| **total** | **{c['total'] / T:,.1f}** | **{100 * c['ratio']:.2f}%** |")
    lines.append(f"| (vanilla bf16) | {c['vanilla'] / T:,.1f} | 100% |")
    if c["storage"]:
        lines.append(f"| + this engine's KIVI storage (15-bit words, whole slots) | {c['storage'] / T:,.1f} | "
                     f"{100 * c['storage'] / c['vanilla']:.2f}% |")
        lines.append(f"| engine total | {c['engine_total'] / T:,.1f} | {100 * c['engine_total'] / c['vanilla']:.2f}% |")
    lines.append("")
    lines.append(f"ratio vs bf16 KV: {c['ratio']:.4f}" + (f" (engine: {c['engine_total'] / c['vanilla']:.4f})"
                                                            if c["storage"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra, overrides = _split(argv)
    cfg = compose(overrides)
    g = geometry(cfg, overrides)
    context = int(extra.get("context", 131072))
    slot_bytes = int(extra.get("slot_bytes", 4 * g.head_dim))
    text = report(g, context, slot_bytes, "python -m experiments.kv_bytes " + " ".join(argv))
    print(text)
    if "out" in extra:
        Path(extra["out"]).write_text(text)
    return text


if __name__ == "__main__":
    main()
