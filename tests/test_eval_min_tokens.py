"""min_tokens (LongBench samsum's ``min_length=context_length+1``): both backends mask EOS and the stop
token ids until that many tokens came out, and give the same tokens on samsum-like prompts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmark.backends import EngineBackend, GenParams, HFBackend, engine_import_error
from tests.eval_tokenizer import build_char_tokenizer

needs_engine = pytest.mark.skipif(engine_import_error() is not None, reason=f"no engine: {engine_import_error()}")

DIALOGUES = [
    ("Anna: Are we still on for lunch?\nBen: Yes, noon at the cafe.", "Anna and Ben meet at noon."),
    ("Tom: I lost my keys.\nMia: Check the car.\nTom: Found them!", "Tom finds his keys in the car."),
    ("Eva: Movie tonight?\nLeo: Sure, 8pm.", "Eva and Leo watch a movie at 8."),
]


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_factory):
    path = tiny_model_factory("llama")
    build_char_tokenizer(path)  # samsum has no chat template: a plain tokenizer is enough
    return path


@pytest.fixture(scope="module")
def backends(tiny_dir):
    hf = HFBackend(str(tiny_dir), dtype="float32")
    eng = EngineBackend(str(tiny_dir), engine_kwargs={"dtype": "float32"})
    yield hf, eng
    eng.close()


def _samsum_dir(tmp_path):
    shots = "\n\n".join(f"Dialogue: {d}\nSummary: {s}" for d, s in DIALOGUES[:2])
    rows = [{"input": f"Dialogue: {d}\nSummary: ", "context": shots, "answers": [s], "length": 60,
             "all_classes": None, "_id": f"samsum-{i}"} for i, (d, s) in enumerate(DIALOGUES)]
    (tmp_path / "samsum.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@needs_engine
def test_min_tokens_parity_engine_vs_hf_on_samsum_prompts(tmp_path, backends):
    from benchmark.eval_runner import compose
    from benchmark.longbench import build_requests

    hf, eng = backends
    cfg = compose(["benchmark=longbench", f"benchmark.data_dir={_samsum_dir(tmp_path)}", "benchmark.tasks=[samsum]",
                   "benchmark.gen_cap=6"])
    reqs = build_requests(cfg.benchmark, hf.tokenizer, hf.max_model_len)
    newline = hf.tokenizer("\n", add_special_tokens=False).input_ids[-1]
    assert all(r.params.min_tokens == 1 and r.params.stop_token_ids == [newline] for r in reqs)
    prompts = [r.prompt_ids for r in reqs]
    # make the greedy first token of every prompt a stop token: without min_tokens the output is empty
    with torch.inference_mode():
        first = [int(hf.model(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    for p, f in zip(prompts, first):
        base = dataclasses.replace(reqs[0].params, stop_token_ids=[newline, f])
        bare = dataclasses.replace(base, min_tokens=0)
        assert hf.generate([p], bare)[0].token_ids == [] and eng.generate([p], bare)[0].token_ids == []
        h, e = hf.generate([p], base)[0], eng.generate([p], base)[0]
        assert h.token_ids and h.token_ids == e.token_ids, (h.token_ids, e.token_ids)
        assert h.token_ids[0] not in (newline, f) and h.text == e.text
    # the whole samsum requests agree too
    assert [o.token_ids for o in hf.generate(prompts, [r.params for r in reqs])] == \
        [o.token_ids for o in eng.generate(prompts, [r.params for r in reqs])]


@needs_engine
def test_engine_backend_refuses_to_drop_a_setting(backends):
    _, eng = backends
    fields = eng._sp_fields
    try:
        eng._sp_fields = fields - {"min_tokens"}
        with pytest.raises(TypeError, match="min_tokens"):
            eng._sp(GenParams(max_tokens=4, min_tokens=1))
        eng._sp(GenParams(max_tokens=4))  # the default (0) needs nothing
    finally:
        eng._sp_fields = fields
    assert eng._sp(GenParams(max_tokens=4, min_tokens=2)).min_tokens == 2
    with pytest.raises(ValueError, match="min_tokens"):
        GenParams(max_tokens=2, min_tokens=3)
