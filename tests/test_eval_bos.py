"""One BOS: prompts rendered with a chat template that already writes BOS (Llama 3 style) are tokenised
without adding special tokens (LongBench, NIAH, AIME); plain prompts keep the tokenizer's BOS."""

from __future__ import annotations

import pytest

from benchmark.eval_runner import compose
from benchmark.fixtures import write_aime, write_longbench
from tests.eval_tokenizer import BOS_CHAT_TEMPLATE, build_char_tokenizer

BOS = 1


@pytest.fixture(scope="module")
def bos_tok():
    tok = build_char_tokenizer(chat_template=BOS_CHAT_TEMPLATE, add_bos=True)
    assert tok("ab").input_ids[0] == BOS  # plain encoding adds BOS ...
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s>")  # ... and the template writes it too
    return tok


@pytest.fixture(scope="module")
def nobos_template_tok():  # the template does not write BOS, the tokenizer adds it
    return build_char_tokenizer(chat_template=BOS_CHAT_TEMPLATE.replace("{{ bos_token }}", ""), add_bos=True)


def _one_bos(ids):
    return ids[0] == BOS and ids.count(BOS) == 1


@pytest.mark.parametrize("which", ["bos_tok", "nobos_template_tok"])
def test_longbench_one_bos(tmp_path, request, which):
    from benchmark.longbench import build_requests

    tok = request.getfixturevalue(which)
    data = write_longbench(tmp_path / "lb")
    b = compose(["benchmark=longbench", f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa,trec,lcc]",
                 "benchmark.limit=1"]).benchmark
    reqs = {r.task: r for r in build_requests(b, tok, 100_000)}
    assert "<|user|>" in tok.decode(reqs["hotpotqa"].prompt_ids)  # chat-wrapped
    assert "<|user|>" not in tok.decode(reqs["trec"].prompt_ids)  # few-shot: plain (official)
    for r in reqs.values():
        assert _one_bos(r.prompt_ids), (r.task, r.prompt_ids[:4])
    ag = build_requests(b, tok, 100_000, query_mode="agnostic")
    for r in ag:
        assert _one_bos(r.context_ids + [t for turn in r.turns for t in turn])


def test_niah_one_bos(bos_tok):
    from benchmark.niah import build_requests

    b = compose(["benchmark=niah", "benchmark.context_lengths=[400]", "benchmark.depths=[0,50]"]).benchmark
    for r in build_requests(b, bos_tok, 100_000):
        assert _one_bos(r.prompt_ids)
        assert abs(len(r.prompt_ids) - 400) <= 4
    for r in build_requests(b, bos_tok, 100_000, query_mode="agnostic"):
        assert _one_bos(r.context_ids + r.turns[0])


def test_aime_one_bos(tmp_path, bos_tok):
    from benchmark.aime import build_requests

    path = write_aime(tmp_path / "aime.jsonl")
    b = compose(["benchmark=aime", f"benchmark.data_path={path}", "benchmark.max_tokens=8"]).benchmark
    reqs = build_requests(b, bos_tok, 100_000)
    assert reqs and all(_one_bos(r.prompt_ids) for r in reqs)
    plain = build_requests(compose(["benchmark=aime", f"benchmark.data_path={path}", "benchmark.max_tokens=8",
                                    "benchmark.chat_template=false"]).benchmark, bos_tok, 100_000)
    assert all(_one_bos(r.prompt_ids) for r in plain)  # plain text keeps the tokenizer's BOS
