"""Scoring functions for the evaluation harnesses (LongBench v1, SCBench, AIME, NIAH).

Each function reproduces the definition used by the benchmark's official scorer, including the
quirks that change published numbers; where we reproduce a quirk on purpose the docstring says so.
All scores are in [0, 1]; the harnesses report 100 x the mean.

Dependencies: ``rouge`` (the ROUGE-L used by LongBench's official ``metrics.py``), ``rouge-score``
(the ``rougeLsum`` used by SCBench through ``evaluate.load("rouge")``), ``nltk`` (sentence BLEU for
SCBench RepoQA); code similarity is difflib's (what the official ``fuzzywuzzy`` computes without
python-Levenshtein), ``rapidfuzz`` only for the non-official ``levenshtein`` variant.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

__all__ = [
    "normalize_answer",
    "token_f1",
    "qa_f1_score",
    "qa_f1_zh_char_score",
    "rouge_l_score",
    "rouge_lsum_score",
    "classification_score",
    "retrieval_score",
    "count_score",
    "code_sim_score",
    "fuzzywuzzy_ratio",
    "first_line",
    "LONGBENCH_METRIC",
    "longbench_sample_score",
    "scbench_sample_score",
    "extract_boxed",
    "normalize_math_answer",
    "math_answers_equal",
    "math_verify_equal",
    "pass_at_k",
    "niah_score",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------------------------
# QA F1 (SQuAD-style normalisation, as LongBench and SCBench use it)
# --------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The order matters and follows the official scorer: lower -> punctuation -> articles -> spaces.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when nothing overlaps."""
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench ``qa_f1_score``: token F1 between the normalised strings."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


_ZH_PUNCT = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def qa_f1_zh_char_score(prediction: str, ground_truth: str, **_) -> float:
    """SCBench ``qa_f1_score_zh``: one character = one token after Chinese normalisation."""

    def norm(s: str) -> str:
        return "".join(ch for ch in "".join(s.lower().split()) if ch not in _ZH_PUNCT)

    return token_f1(list(norm(prediction)), list(norm(ground_truth)))


# --------------------------------------------------------------------------------------------
# ROUGE
# --------------------------------------------------------------------------------------------
def rouge_l_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench ``rouge_score``: ROUGE-L F of the ``rouge`` package (summary-level union LCS).

    The ``rouge`` package splits both texts into "sentences" on ``.``, counts unique words, and
    raises on empty input; the official scorer turns any exception into 0.0, and so do we.
    """
    from rouge import Rouge

    try:
        scores = Rouge(metrics=["rouge-l"]).get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # noqa: BLE001 - the official scorer does exactly this (bare except -> 0)
        return 0.0
    return float(scores["rouge-l"]["f"])


_LSUM_SCORER = None


def rouge_lsum_score(prediction: str, ground_truth: str, **_) -> float:
    """SCBench summary metric: ``rougeLsum`` F-measure of ``rouge-score`` (no stemming), which is
    what ``evaluate.load("rouge")`` computes by default. Sentences are split on newlines."""
    global _LSUM_SCORER
    if _LSUM_SCORER is None:
        from rouge_score import rouge_scorer

        _LSUM_SCORER = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    return float(_LSUM_SCORER.score(ground_truth, prediction)["rougeLsum"].fmeasure)


# --------------------------------------------------------------------------------------------
# Classification / retrieval / count / code (LongBench)
# --------------------------------------------------------------------------------------------
def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_) -> float:
    """LongBench ``classification_score`` (trec, lsht), reproducing the official behaviour exactly.

    Official code: collect every class name that is a substring of the prediction; then, iterating
    over that list while removing from it, drop the names that are a substring of the ground truth
    but differ from it (removing while iterating skips the element right after each removal, which
    we reproduce); score = 1/len(matches) if the ground truth survived, else 0. The official
    fallback to the most similar class (difflib) sits behind ``if em_match_list != 0``, which is
    always true for a list, so it never runs: an empty match list scores 0.
    """
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):  # list.remove-while-iterating semantics of the official loop
        name = matches[i]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)  # removes the first equal element, then the iterator moves on
        i += 1
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def classification_score_difflib_fallback(prediction: str, all_classes: Sequence[str]) -> str | None:
    """The most similar class by difflib ratio (the dead fallback branch of the official scorer);
    exposed for analysis only, never used in scores."""
    best, best_sim = None, 0.0
    for name in all_classes:
        sim = difflib.SequenceMatcher(None, name, prediction).ratio()
        if sim > best_sim:
            best, best_sim = name, sim
    return best


def _fraction_equal(numbers: list[str], target: str) -> float:
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench ``retrieval_score`` (passage_retrieval_en): the gold id is the number in
    "Paragraph N"; score = share of the integers in the prediction that equal it."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"passage_retrieval ground truth {ground_truth!r} has no 'Paragraph N'")
    return _fraction_equal(re.findall(r"\d+", prediction), found[0])


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench ``count_score`` (passage_count): share of the integers in the prediction equal to
    the gold count."""
    return _fraction_equal(re.findall(r"\d+", prediction), str(ground_truth))


def fuzzywuzzy_ratio(s1: str | None, s2: str | None) -> int:
    """``fuzzywuzzy.fuzz.ratio`` as LongBench's requirements install it (fuzzywuzzy without
    python-Levenshtein, so difflib): None -> 0, equal strings -> 100 (two empty strings included),
    one empty string -> 0, else ``int(round(100 * SequenceMatcher(None, s1, s2).ratio()))`` with
    difflib's defaults (autojunk on) and Python's round-half-to-even."""
    if s1 is None or s2 is None:
        return 0
    if s1 == s2:
        return 100
    if len(s1) == 0 or len(s2) == 0:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, s1, s2).ratio()))


def levenshtein_ratio(s1: str, s2: str) -> int:
    """``fuzz.ratio`` of fuzzywuzzy WITH python-Levenshtein (= rapidfuzz's Indel ratio), rounded the
    same way. Not the official LongBench number (its requirements install plain fuzzywuzzy)."""
    from rapidfuzz import fuzz

    if s1 == s2:
        return 100
    if not s1 or not s2:
        return 0
    return int(round(fuzz.ratio(s1, s2)))


CODE_SIM_BACKENDS = {"difflib": fuzzywuzzy_ratio, "levenshtein": levenshtein_ratio}


def code_sim_score(prediction: str, ground_truth: str, backend: str = "difflib", **_) -> float:
    """LongBench ``code_sim_score`` (lcc, repobench-p).

    The prediction is cut to its first line (after leading newlines) that contains none of
    ``` ` ```, ``#``, ``//`` (the empty string if none does); score = ``fuzz.ratio(line, gold) / 100``
    with the official ``fuzz.ratio``: fuzzywuzzy's difflib ``SequenceMatcher`` ratio, rounded to an
    integer percentage (``fuzzywuzzy_ratio``). ``backend="levenshtein"`` gives the python-Levenshtein /
    rapidfuzz variant instead (differs on many pairs; not the published numbers).
    """
    if backend not in CODE_SIM_BACKENDS:
        raise ValueError(f"code_sim backend must be one of {sorted(CODE_SIM_BACKENDS)}, got {backend!r}")
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return CODE_SIM_BACKENDS[backend](line, ground_truth) / 100


def first_line(prediction: str) -> str:
    """The few-shot tasks' post-processing (trec, triviaqa, samsum, lsht): first line only."""
    return prediction.lstrip("\n").split("\n")[0]


LONGBENCH_METRIC = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_l_score,
    "qmsum": rouge_l_score,
    "multi_news": rouge_l_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_l_score,
    "passage_count": count_score,
    "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def longbench_sample_score(task: str, prediction: str, answers: Sequence[str], all_classes=None) -> float:
    """Score of one LongBench sample: max over the gold answers, after first-line post-processing
    for the few-shot tasks (the official ``scorer``)."""
    if task not in LONGBENCH_METRIC:
        raise KeyError(f"No LongBench metric for task {task!r}; known: {', '.join(LONGBENCH_METRIC)}")
    if task in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    metric = LONGBENCH_METRIC[task]
    best = 0.0
    for gold in answers:
        best = max(best, metric(prediction, gold, all_classes=all_classes or []))
    return float(best)


# --------------------------------------------------------------------------------------------
# SCBench (official compute_scores.py semantics; InfiniteBench scorers for the mapped tasks)
# --------------------------------------------------------------------------------------------
def _first_int(prediction: str) -> str:
    for part in re.split(r"[^0-9]", prediction):
        if part:
            return part
    return ""


def _score_kv(pred, label) -> float:  # kv_retrieval, prefix_suffix, hashhop: substring match
    if isinstance(label, list):
        label = label[0]
    return float(str(label) in pred)


def _score_passkey(pred, label) -> float:  # corrected: the label's text
    if isinstance(label, list):
        label = label[0]
    return float(str(label) == _first_int(pred))


def _score_passkey_official(pred, label) -> float:
    """Official: ``label == first_int_match(pred)``, the label as stored (an int label never equals)."""
    if isinstance(label, list):
        label = label[0]
    return float(label == _first_int(pred))


def _score_string_match_all(pred, label) -> float:  # scbench_vt, corrected: a string label is one reference
    refs = label if isinstance(label, list) else [label]
    return round(sum(1.0 for r in refs if str(r).lower() in pred.lower()) / len(refs), 2)


def _score_string_match_all_official(pred, label) -> float:
    """Official ``string_match_all``: ``for r in ref`` over the label as stored (characters of a string)."""
    return round(sum(1.0 for r in label if str(r).lower() in pred.lower()) / len(label), 2)


def _score_contains_upper(pred, label) -> float:  # longdialogue_qa_eng (qa_eng, many_shot), corrected
    labels = label if isinstance(label, list) else [label]
    up = pred.strip().upper()
    return float(any(str(item).upper() in up for item in labels))


def _score_contains_upper_official(pred, label) -> float:
    """Official ``get_score_one_longdialogue_qa_eng``: ``for item in label`` over the label as stored, so
    a string label (many_shot) counts any of its characters found in the prediction as correct."""
    up = pred.strip().upper()
    return float(any(str(item).upper() in up for item in label))


def _score_choice(pred, label) -> float:  # longbook_choice_eng; label = [option text, letter]
    pred = pred.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in label)
    if pred in label:
        return 1.0
    for ch in ["\n", '"', "'", ".", ",", "?", "!", "{", "}"]:
        pred = pred.replace(ch, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ["answer is:", "answer:", "answer is", "option is"]:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1 :]
        return float(any(after.startswith(s) for s in label))
    for word in pred.split():
        if word in "ABCD":  # substring test, as in the official scorer
            return float(word in label)
    return 0.0


def _score_math_find(pred, label) -> float:
    if isinstance(label, list):
        label = label[0]
    found = re.search(r"\d+\.\d+|\d+", pred)
    if found is None:
        return 0.0
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        try:
            label = float(label) if "." in str(label) else int(label)
        except ValueError:
            return 0.0
    if isinstance(label, int):
        return float(int(float(found.group(0))) == label)
    return float(float(found.group(0)) == label)


def _score_qa_f1_max(pred, label) -> float:
    labels = label if isinstance(label, list) else [label]
    return max((qa_f1_score(pred, g) for g in labels), default=0.0)


def _score_qa_zh(pred, label) -> float:  # corrected: a string label is one answer
    labels = label if isinstance(label, list) else [label]
    return max((qa_f1_zh_char_score(pred, g) for g in labels), default=0.0)


def _score_qa_zh_official(pred, label) -> float:
    """Official ``qa_f1_score_zh(pred, label)``: ``for ground_truth in ground_truths`` over the label as
    stored: a string label (qa_chn) gives the best F1 against each single character."""
    return max((qa_f1_zh_char_score(pred, g) for g in label), default=0.0)


def _score_summary(pred, label) -> float:
    return rouge_lsum_score(pred, label if isinstance(label, str) else label[0])


SCBENCH_SCORER = {
    "scbench_kv": _score_kv,
    "scbench_kv_hard": _score_kv,
    "scbench_kv_compressible": _score_kv,
    "scbench_hashhop": _score_kv,
    "scbench_prefix_suffix": _score_kv,
    "scbench_passkey": _score_passkey,
    "scbench_vt": _score_string_match_all,
    "scbench_qa_eng": _score_contains_upper,
    "scbench_many_shot": _score_contains_upper,
    "scbench_choice_eng": _score_choice,
    "scbench_qa_chn": _score_qa_zh,
    "scbench_mf": _score_math_find,
    "scbench_summary": _score_summary,
}


# The official scorers where they differ from the corrected ones (labels iterated as stored).
SCBENCH_SCORER_OFFICIAL = {
    **SCBENCH_SCORER,
    "scbench_passkey": _score_passkey_official,
    "scbench_vt": _score_string_match_all_official,
    "scbench_qa_eng": _score_contains_upper_official,
    "scbench_many_shot": _score_contains_upper_official,
    "scbench_qa_chn": _score_qa_zh_official,
}


def scbench_sample_score(task: str, prediction: str, label, scoring: str = "official") -> float:
    """Score of one SCBench turn (tasks other than RepoQA, which is scored per repository).
    ``scoring="official"``: the published scorers, quirks included; ``"corrected"``: whole labels."""
    table = {"official": SCBENCH_SCORER_OFFICIAL, "corrected": SCBENCH_SCORER}.get(scoring)
    if table is None:
        raise ValueError(f"SCBench scoring must be 'official' or 'corrected', got {scoring!r}")
    if task not in table:
        raise KeyError(f"No SCBench turn scorer for {task!r}; known: {', '.join(table)}")
    return float(table[task](prediction, label))


_CODE_BLOCK = re.compile(r"^```(?:\w+)?\s*\n(.*?)(?=^```)```", re.DOTALL | re.MULTILINE)

# RepoQA's tree-sitter query of a function definition per language (repoqa / SCBench repo_qa_utils).
REPOQA_FUNCTION_QUERY = {
    "python": "(function_definition name: (_)) @fdef",
    "java": "(method_declaration name: (_)) @fdef",
    "typescript": "(function_declaration name: (_)) @fdef",
    "rust": "(function_item name: (_)) @fdef",
    "cpp": "(function_definition declarator: (function_declarator declarator: (identifier))) @fdef",
    "go": "(function_declaration name: (_)) @fdef",
}


_TS_CACHE: dict = {}


def _tree_sitter(lang: str):
    """(parser, function query) of ``lang`` from ``tree_sitter_languages`` (cached; its FutureWarning
    about tree-sitter's deprecated Language constructor silenced)."""
    if lang not in _TS_CACHE:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from tree_sitter_languages import get_language, get_parser

            _TS_CACHE[lang] = (get_parser(lang), get_language(lang).query(REPOQA_FUNCTION_QUERY[lang]))
    return _TS_CACHE[lang]


def tree_sitter_error() -> str | None:
    """None when ``tree_sitter_languages`` (with tree-sitter 0.21) parses here, else the reason."""
    try:
        parser, _ = _tree_sitter("python")
        parser.parse(b"def f():\n    pass\n")
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _captured_nodes(captures) -> list:
    if isinstance(captures, dict):  # tree-sitter >= 0.23: {name: [nodes]}
        return sorted((n for nodes in captures.values() for n in nodes), key=lambda n: n.start_byte)
    return [c[0] for c in captures]  # tree-sitter 0.21: [(node, name)]


def extract_code_block(text: str, lang: str | None = None, sanitizer: str = "tree_sitter") -> str:
    """RepoQA's output sanitiser. Without fenced code blocks: the whole (stripped) output. With them:
    ``tree_sitter`` (official) returns the first function definition tree-sitter finds in the blocks,
    in order, and the first block when none has one; ``first_block`` returns the first block."""
    text = text.strip()
    blocks = _CODE_BLOCK.findall(text)
    if not blocks:
        return text
    if sanitizer == "tree_sitter":
        if lang not in REPOQA_FUNCTION_QUERY:
            raise ValueError(f"RepoQA's tree-sitter sanitiser needs the sample's language, one of "
                             f"{', '.join(REPOQA_FUNCTION_QUERY)}; got {lang!r}")
        parser, query = _tree_sitter(lang)
        for block in blocks:
            try:
                data = block.encode("utf8")
                for node in _captured_nodes(query.captures(parser.parse(data).root_node)):
                    return data[node.start_byte:node.end_byte].decode("utf8")
            except Exception:  # noqa: BLE001 - the official sanitiser skips a block it cannot parse
                pass
    elif sanitizer != "first_block":
        raise ValueError(f"RepoQA sanitizer must be 'tree_sitter' or 'first_block', got {sanitizer!r}")
    return blocks[0]


def code_bleu_similarity(candidate: str, reference: str) -> float:
    """RepoQA's function similarity: sentence BLEU over whitespace tokens, smoothing method 4."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    cand = re.split(r"\s+", candidate.strip())
    ref = re.split(r"\s+", reference.strip())
    return float(sentence_bleu([ref], cand, smoothing_function=SmoothingFunction().method4))


def repoqa_best_match(prediction: str, needles: Sequence[dict], lang: str | None = None,
                      sanitizer: str = "tree_sitter") -> tuple[str | None, float]:
    """Among a repository's needle functions ({'name', 'needle'}), the one most similar to the
    code the model produced, and that similarity."""
    code = extract_code_block(prediction, lang, sanitizer)
    best_name, best_sim = None, 0.0
    for needle in needles:
        sim = code_bleu_similarity(code, needle["needle"])
        if sim > best_sim:
            best_name, best_sim = needle["name"], sim
    return best_name, best_sim


def repoqa_score(prediction: str, func_name: str, needles: Sequence[dict], threshold: float = 0.8,
                 lang: str | None = None, sanitizer: str = "tree_sitter") -> float:
    """RepoQA pass@1 at the official reporting threshold 0.8: the best-matching needle must be the
    asked function and its BLEU similarity at least ``threshold``."""
    name, sim = repoqa_best_match(prediction, needles, lang, sanitizer)
    return float(name == func_name and sim >= threshold)


# --------------------------------------------------------------------------------------------
# AIME: \boxed{} extraction, normalisation, pass@k
# --------------------------------------------------------------------------------------------
def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces;
    ``\\boxed 42`` (no braces) is accepted too. None when there is none."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    rest = rest[len("\\boxed") :] if rest.startswith("\\boxed") else rest[len("\\fbox") :]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        token = rest.strip().split()
        return token[0].rstrip("$.,") if token else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None  # unbalanced: the generation was cut inside the box


_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_math_answer(answer: str | None) -> str | None:
    """Canonical form of a short math answer: strip ``$``, spaces, ``\\text{}`` wrappers, degree
    signs, a trailing period, thousands separators, ``\\left/\\right``, ``\\dfrac -> \\frac``; an
    integer-valued number becomes its integer string (``042`` -> ``42``, ``3.0`` -> ``3``)."""
    if answer is None:
        return None
    s = str(answer).strip()
    s = _TEXT_WRAP.sub(r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("$", ""),
                     ("\\!", ""), ("\\,", ""), ("\\ ", "")):
        s = s.replace(old, new)
    s = "".join(s.split()).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", s):
        value = float(s)
        if value.is_integer():
            return str(int(value))
        return repr(value)
    return s


def math_verify_error() -> str | None:
    """None when ``math_verify`` (HF's answer verifier, used by lighteval and open-r1) imports, else why."""
    try:
        import math_verify  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def math_verify_parse(text: str, gold: bool = False) -> list:
    """``math_verify.parse`` with its default extraction (LaTeX incl. ``\\boxed{}``, then plain
    expressions such as "The final answer is 33"); the gold is parsed as an expression. Its
    signal-based timeouts only work in the main thread, so they are off elsewhere."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    timeout = {} if _in_main_thread() else {"parsing_timeout": None}
    if gold:
        text = str(text).strip()
        return parse(text if "$" in text or "\\" in text else f"${text}$",
                     extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], **timeout)
    return parse(text, **timeout)


def math_verify_equal(prediction_text: str, gold: str | int) -> bool:
    """math-verify's verdict: the answer parsed from the generation is mathematically equal to the gold."""
    from math_verify import verify

    g = math_verify_parse(str(gold), gold=True)
    pred = math_verify_parse(prediction_text)
    if not g or not pred:
        return False
    timeout = {} if _in_main_thread() else {"timeout_seconds": None}
    return bool(verify(g, pred, **timeout))


def math_answers_equal(prediction_text: str, gold: str | int, checker: str | None = None) -> bool:
    """Is the generation's answer the gold answer? ``checker``: ``math_verify`` (default when it is
    installed: ``\\boxed{m+n=33}``, ``\\boxed{\\dfrac{66}{2}}``, "The final answer is 33." are all 33) or
    ``string`` (the last ``\\boxed{}`` equal to the gold after ``normalize_math_answer``; the fallback)."""
    if checker is None:
        checker = "math_verify" if math_verify_error() is None else "string"
    if checker == "math_verify":
        return math_verify_equal(prediction_text, gold)
    if checker != "string":
        raise ValueError(f"math answer checker must be 'math_verify' or 'string', got {checker!r}")
    pred = normalize_math_answer(extract_boxed(prediction_text))
    return pred is not None and pred == normalize_math_answer(str(gold))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# --------------------------------------------------------------------------------------------
# NIAH
# --------------------------------------------------------------------------------------------
def niah_score(prediction: str, needle_value: str) -> float:
    """Exact retrieval: 1 when the needle's value appears verbatim in the generation."""
    return float(str(needle_value) in prediction)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
