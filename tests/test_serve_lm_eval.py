"""lm-eval's `local-completions` model against a live `deltakv-serve` on a task defined in the repo
(benchmark/lm_eval_tasks/deltakv_capitals: local data, no download) scores what the same task scores
through the engine in-process, with the same generations. Model: the shipped SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")

from lm_eval.api.model import LM  # noqa: E402

from serving import BackgroundServer, ServeSettings, build_app  # noqa: E402
from sparse_engine import LLM, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK = "deltakv_capitals"
NAME = "smollm2-135m"


class EngineLM(LM):
    """The engine in-process as an lm-eval model (generate_until only)."""

    def __init__(self, llm: LLM):
        super().__init__()
        self.llm = llm

    def generate_until(self, requests, disable_tqdm: bool = False):
        prompts, params = [], []
        for req in requests:
            context, kw = req.args
            kw = dict(kw)
            until = kw.get("until") or []
            params.append(SamplingParams(temperature=0.0, max_tokens=int(kw.get("max_gen_toks", 256)),
                                         stop=[until] if isinstance(until, str) else list(until)))
            prompts.append(context)
        return [o.outputs[0].text for o in self.llm.generate(prompts, params, use_tqdm=False)]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generate_until tasks only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generate_until tasks only")


def _run(model, model_args=None) -> tuple[float, list[str]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                          task_manager=TaskManager(include_path=str(REPO / "benchmark" / "lm_eval_tasks")))
    score = res["results"][TASK]["exact_match,strip"]
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return score, [s["resps"][0][0] for s in samples]


@pytest.mark.slow
def test_lm_eval_local_completions_equals_the_engine_in_process(shipped_model_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    offline_score, offline_resps = _run(EngineLM(LLM(shipped_model_path, dtype="float32", kv_cache_bytes=256 << 20)))
    llm = LLM(shipped_model_path, dtype="float32", kv_cache_bytes=256 << 20)
    with BackgroundServer(build_app(llm, ServeSettings(served_model_name=NAME))) as srv:
        args = (f"model={NAME},base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={shipped_model_path},tokenized_requests=False,batch_size=4,num_concurrent=2,max_retries=1")
        served_score, served_resps = _run("local-completions", args)
    assert len(served_resps) == 20
    assert served_resps == offline_resps
    assert served_score == offline_score
    assert offline_score > 0.25, "the shipped model knows some capitals (the task is not vacuous)"
