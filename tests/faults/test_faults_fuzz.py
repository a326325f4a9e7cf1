"""Property-style fuzz (hypothesis) of the knobs a user types: `SamplingParams`, engine knobs
(`LLM(path, **knobs)`) and training overrides (Hydra `key=value` strings).

The property: every input gets either a clear ValueError / TypeError, raised by the validation code
and naming the field, or a correct result (a generate that honours the limits, a training config
that HF's `TrainingArguments` accepts) - never a traceback from deep inside torch / transformers /
the engine's step, and never a value silently accepted that later fails.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz needs hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparse_engine import LLM, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True, database=None)


def raised_in(exc: BaseException) -> str:
    """Repository-relative file of the innermost frame of `exc` (or the outside file's name)."""
    frames = traceback.extract_tb(exc.__traceback__)
    path = Path(frames[-1].filename).resolve()
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return f"<outside>{path}"


def assert_clear(exc: BaseException, names, where: tuple[str, ...]) -> None:
    msg = str(exc)
    assert isinstance(exc, (ValueError, TypeError)), f"{type(exc).__name__}: {msg}"
    assert raised_in(exc) in where, f"raised deep inside {raised_in(exc)}: {type(exc).__name__}: {msg}"
    assert any(n in msg for n in names), f"the message names none of {sorted(names)}: {msg}"


ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.integers(min_value=2**62, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-320, 1e-6, 0.5, 1.0, 2.0, 1e308]),
    st.text(max_size=3), st.lists(st.integers(-3, 300), max_size=3), st.lists(st.text(max_size=2), max_size=2),
)
SP_FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stop_token_ids", "ignore_eos",
             "min_tokens", "return_logits"]
SP_WHERE = ("sparse_engine/sampling_params.py",)


@settings(FUZZ, max_examples=400)
@given(kw=st.dictionaries(st.sampled_from(SP_FIELDS), ANY, max_size=4))
def test_sampling_params_fuzz(kw):
    try:
        sp = SamplingParams(**kw)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions
        assert_clear(e, kw.keys(), SP_WHERE)
        return
    assert math.isfinite(sp.temperature) and sp.temperature >= 0 and 0 < sp.top_p <= 1
    assert isinstance(sp.max_tokens, int) and sp.max_tokens >= 1 and isinstance(sp.top_k, int) and sp.top_k >= 0
    assert all(isinstance(s, str) and s for s in sp.stop)
    assert all(isinstance(t, int) and t >= 0 for t in sp.stop_token_ids)


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    return LLM(tiny_model_factory("llama"), dtype="float32", device="cpu", kv_cache_bytes=1 << 22)


SMALLISH = st.one_of(st.integers(-2, 12), st.floats(allow_nan=True), st.sampled_from([0.0, 1e-320, 0.3, 1.0, 5.0]),
                     st.none(), st.text(max_size=2), st.lists(st.integers(0, 300), max_size=2),
                     st.lists(st.sampled_from(["", "a", "the", "\n"]), max_size=2))


@settings(FUZZ, max_examples=60)
@given(kw=st.dictionaries(st.sampled_from(SP_FIELDS), SMALLISH, max_size=5),
       prompt=st.lists(st.integers(3, 255), min_size=1, max_size=40))
def test_sampling_params_through_the_engine(engine, kw, prompt):
    """Accepted params give a correct generate: 1..max_tokens tokens, a valid finish reason, the
    stop token ids and min_tokens honoured, nothing left in the engine."""
    try:
        sp = SamplingParams(**kw)
    except Exception as e:  # noqa: BLE001
        assert_clear(e, kw.keys(), SP_WHERE)
        return
    out = engine.generate([prompt], sp, use_tqdm=False)[0]
    ids = list(out["token_ids"])
    assert 1 <= len(ids) <= sp.max_tokens and out["finish_reason"] in ("stop", "length")
    assert len(ids) >= min(sp.min_tokens, sp.max_tokens) or out["finish_reason"] == "length"
    stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(engine.spec.eos_token_ids))
    assert not stops.intersection(ids[:-1]), "generation went on past a stop token"
    assert engine.kv_stats()["slots_used"] == 0 and not engine.scheduler.has_work()


ENGINE_VALUES = {
    "device": st.sampled_from(["auto", "cpu", "cuda:99", "gpu", "", "CPU", 3, None]),
    "dtype": st.sampled_from(["auto", "float32", "bfloat16", "fp32", 1, None]),
    "max_num_seqs": st.one_of(st.integers(-2, 8), st.sampled_from([2.0, 2.5, "4", True, None])),
    "max_num_batched_tokens": st.one_of(st.integers(-2, 256), st.sampled_from([64.0, "64", None])),
    "chunk_prefill_size": st.one_of(st.integers(-2, 128), st.sampled_from([16.5, "16", None])),
    "max_model_len": st.one_of(st.none(), st.integers(-2, 5000), st.sampled_from([64.5, "64"])),
    "kv_cache_bytes": st.one_of(st.integers(-10, 1 << 22), st.sampled_from([float(1 << 20), 1e5 + 0.5, math.nan,
                                                                          math.inf, "1GB", True])),
    "gpu_memory_utilization": st.one_of(st.floats(allow_nan=True), st.sampled_from(["0.5", None])),
    "seed": st.one_of(st.integers(-10, 10), st.sampled_from([2**70, 1.5, "0", None])),
    "use_triton": st.sampled_from(["auto", False, "yes", None]),
    "load_format": st.sampled_from(["safetensors", "random", "pt", None]),
}
ENGINE_WHERE = ("sparse_engine/config.py", "sparse_engine/llm.py", "sparse_engine/cache/pool.py")


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_engine_knobs_fuzz(tiny_model_factory, data):
    path = tiny_model_factory("llama")
    names = data.draw(st.lists(st.sampled_from(sorted(ENGINE_VALUES)), max_size=4, unique=True))
    kw = {n: data.draw(ENGINE_VALUES[n], label=n) for n in names}
    kw.setdefault("kv_cache_bytes", 1 << 22)  # never the 1 GiB CPU default in a fuzz loop
    if kw["kv_cache_bytes"] is None:
        kw["kv_cache_bytes"] = 1 << 22
    try:
        llm = LLM(path, **kw)
        out = llm.generate([list(range(3, 30))], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
    except Exception as e:  # noqa: BLE001
        assert_clear(e, [*kw, "Raise kv_cache_bytes", "kv_cache_bytes"], ENGINE_WHERE)
        return
    assert 1 <= len(out["token_ids"]) <= 4 and llm.kv_stats()["slots_used"] == 0


TRAIN_VALUES = ["0", "1", "-1", "2", "3.5", "1e-3", "abc", "null", "true", "[1,2]", "''", "1e400", "nan"]
TRAIN_KEYS = ["trainer.max_steps", "trainer.save_steps", "trainer.logging_steps", "trainer.learning_rate",
              "trainer.per_device_train_batch_size", "trainer.gradient_accumulation_steps", "trainer.warmup_ratio",
              "trainer.save_total_limit", "trainer.max_grad_norm", "trainer.lr_scheduler_type", "trainer.bf16",
              "trainer.torch_threads", "trainer.weight_decay", "eval.max_sequences", "eval.batch_size", "seed"]


@settings(FUZZ, max_examples=80)
@given(pairs=st.lists(st.tuples(st.sampled_from(TRAIN_KEYS), st.sampled_from(TRAIN_VALUES)), min_size=1, max_size=3,
                      unique_by=lambda kv: kv[0]))
def test_training_overrides_fuzz(tmp_path_factory, pairs):
    """`deltakv-train key=value ...`: a clear ValueError naming the key, or a config that HF's
    TrainingArguments accepts as is."""
    from hydra import compose, initialize_config_dir

    from deltakv.config import TrainConfig
    from deltakv.train import CONF_DIR
    from deltakv.trainer import training_arguments

    out = tmp_path_factory.mktemp("fuzz_train")
    overrides = [f"output_dir={out}", *(f"{k}={v}" for k, v in pairs)]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    try:
        tc = TrainConfig.from_omegaconf(cfg)
    except Exception as e:  # noqa: BLE001
        assert_clear(e, [k for k, _ in pairs], ("deltakv/config.py",))
        return
    args = training_arguments(tc)  # must not raise: HF accepts every value the config let through
    assert args.save_steps >= 1 and args.max_steps >= 0
