"""SCBench task specification: file names, maximum new tokens per turn and prompt templates of
microsoft/MInference ``scbench/eval_utils.py`` (multi-turn, same-context-different-query (scdq) and
chat follow-up forms). Strings are kept byte-identical, typos included ("The the correct answer")."""

from __future__ import annotations

TASKS: tuple[str, ...] = (
    "scbench_kv", "scbench_kv_hard", "scbench_prefix_suffix", "scbench_vt", "scbench_hashhop", "scbench_passkey",
    "scbench_repoqa", "scbench_qa_eng", "scbench_qa_chn", "scbench_choice_eng", "scbench_many_shot", "scbench_mf",
    "scbench_summary", "scbench_summary_with_needles", "scbench_repoqa_and_kv", "scbench_kv_compressible",
)

# The official runner's task set (scbench/scripts/run_all_tasks.sh), in its order; the default here.
OFFICIAL_TASKS: tuple[str, ...] = (
    "scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng", "scbench_qa_chn",
    "scbench_choice_eng", "scbench_many_shot", "scbench_summary", "scbench_mf", "scbench_summary_with_needles",
    "scbench_repoqa_and_kv",
)
OFFICIAL_MAX_TURNS = 5  # run_scbench.py --max_turns default

MAX_NEW_TOKENS: dict[str, int | dict[str, int]] = {
    "scbench_choice_eng": 40, "scbench_qa_eng": 40, "scbench_qa_chn": 40, "scbench_kv": 150,
    "scbench_kv_hard": 150, "scbench_mf": 5, "scbench_hashhop": 150, "scbench_prefix_suffix": 150,
    "scbench_kv_compressible": 150, "scbench_passkey": 15, "scbench_repoqa": 1024, "scbench_summary": 200,
    "scbench_vt": 30, "scbench_many_shot": 10,
    "scbench_summary_with_needles": {"scbench_summary": 800, "scbench_passkey": 15},
    "scbench_repoqa_and_kv": {"scbench_repoqa": 1024, "scbench_kv": 80},
}

_KV = "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}"
_CHOICE_Q = ("Question: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\n"
             "The the correct answer is")

# First turn of a multi-turn session (context + first query).
FIRST_TURN: dict[str, str] = {
    "scbench_passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                        "I will quiz you about the important information.\n\n{context}\n\n{input}"),
    "scbench_kv": _KV + "\n\n{input}",
    "scbench_kv_hard": _KV + "\n\n{input}",
    "scbench_kv_compressible": ("Extract the value corresponding to the specified key in the following passage.\n\n"
                                "{context}\n\n{input}"),
    "scbench_choice_eng": "Read the book and answer the question.\n\n{context}\n\n" + _CHOICE_Q,
    "scbench_qa_eng": ("Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                       "Question: {question}\nAnswer:"),
    "scbench_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "scbench_mf": "{prefix}\n\n{context}\n\n{input}",
    "scbench_repoqa": ("Based on the function description and code context, please retrieve and repeat the exact "
                       "described function from the code context in a code block wrapped by ```:\n\n{context}\n\n{input}"),
}
for _t in ("scbench_summary", "scbench_vt", "scbench_many_shot", "scbench_summary_with_needles",
           "scbench_repoqa_and_kv", "scbench_hashhop", "scbench_prefix_suffix"):
    FIRST_TURN[_t] = "{context}\n\n{input}"

# Follow-up turn without chat template: golden previous answer, then the query.
FOLLOW_UP: dict[str, str] = {t: "{pre_ans}\n\n{input}" for t in TASKS}
FOLLOW_UP["scbench_passkey"] = "{pre_ans}.\n\n{input}"
FOLLOW_UP["scbench_choice_eng"] = ("{pre_ans}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\n"
                                   "D. {OPTION_D}\n\nThe letter of the correct answer is")
FOLLOW_UP["scbench_qa_eng"] = "{pre_ans}\n\nQuestion: {question}\nAnswer:"
FOLLOW_UP["scbench_qa_chn"] = "{pre_ans}\n\n问题：{question}\n答案："
FOLLOW_UP["scbench_mf"] = "{pre_ans}\n\n{prefix}\n\n{input}"

# Query in chat form (chat follow-ups and scdq queries).
CHAT_QUERY: dict[str, str] = {t: "{input}" for t in TASKS}
CHAT_QUERY["scbench_choice_eng"] = _CHOICE_Q
CHAT_QUERY["scbench_qa_eng"] = "Question: {question}\nAnswer:"
CHAT_QUERY["scbench_qa_chn"] = "问题：{question}\n答案："
CHAT_QUERY["scbench_mf"] = "{prefix}\n\n{input}"

# scdq (same context, different queries): the shared context prompt. math_find's official scdq
# context puts the FIRST turn's raw input (not the "What is ...?" question) before the context.
SCDQ_CONTEXT: dict[str, str] = {t: FIRST_TURN[t].split("{context}")[0] + "{context}" for t in TASKS if t in FIRST_TURN}
SCDQ_CONTEXT["scbench_mf"] = "{first_input}\n\n{context}"

SOURCE_HINT = (
    "Get them from the Hugging Face dataset microsoft/SCBench (folder data/, one <task>.jsonl per task), e.g. "
    "huggingface.co/datasets/microsoft/SCBench/resolve/main/data/scbench_kv.jsonl, or with hub access "
    "`datasets.load_dataset('microsoft/SCBench', TASK, split='test').to_json('TASK.jsonl')`; then set "
    "benchmark.data_dir to that folder."
)
