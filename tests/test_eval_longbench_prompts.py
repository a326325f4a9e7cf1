"""LongBench prompts byte-identical to the official config/dataset2prompt.json (typos included:
narrativeqa's "asconcisely", qasper's "\\n\\n Answer", multi_news's "news. \\n"), and the official
dataset2maxlen.json; the strings below are a verbatim copy of the 16 English entries of those files
(THUDM/LongBench, LongBench/config/)."""

from __future__ import annotations

OFFICIAL_PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
OFFICIAL_MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64}


def test_prompts_byte_identical_to_official():
    from benchmark.longbench.spec import MAX_NEW_TOKENS, PROMPTS, TASKS

    assert list(TASKS) == list(OFFICIAL_PROMPTS)
    for task, want in OFFICIAL_PROMPTS.items():
        assert PROMPTS[task].encode() == want.encode(), task
    assert MAX_NEW_TOKENS == OFFICIAL_MAXLEN
    assert PROMPTS["narrativeqa"].count("asconcisely") == 2


def test_formatted_prompt_is_the_official_format(tmp_path):
    """``template.format(**sample)`` as pred.py does: the built prompt text equals the official one."""
    import json

    from transformers import AutoTokenizer

    from benchmark.eval_runner import compose
    from benchmark.longbench import build_requests
    from data_prepare.resources import shipped_model_dir

    row = {"input": "Who is the hero?", "context": "A story about Ann. Ann saves the town.", "answers": ["Ann"],
           "length": 9, "all_classes": None, "_id": "x", "dataset": "narrativeqa", "language": "en"}
    (tmp_path / "narrativeqa.jsonl").write_text(json.dumps(row) + "\n")
    tok = AutoTokenizer.from_pretrained(shipped_model_dir())
    b = compose(["benchmark=longbench", f"benchmark.data_dir={tmp_path}", "benchmark.tasks=[narrativeqa]",
                 "benchmark.chat_template=false"]).benchmark
    req = build_requests(b, tok, 8192)[0]
    assert tok.decode(req.prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == \
        OFFICIAL_PROMPTS["narrativeqa"].format(**row)
