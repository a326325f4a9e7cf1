"""Every scoring function against values computed by hand (official definitions and quirks)."""

import math

import pytest

from benchmark import metrics as M


# ---------------------------------------------------------------- QA F1
def test_normalize_answer_order():
    # punctuation goes before the articles are removed; whitespace collapsed
    assert M.normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"
    assert M.normalize_answer("An apple-pie") == "applepie"


def test_qa_f1_hand_values():
    # pred tokens [cat, sat, on, mat], gold [cat, sat] -> P = 2/4, R = 2/2, F1 = 2*.5*1/1.5
    assert M.qa_f1_score("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    assert M.qa_f1_score("Paris", "paris.") == 1.0
    assert M.qa_f1_score("London", "Paris") == 0.0
    assert M.qa_f1_score("", "Paris") == 0.0
    # multiset overlap: pred [a1, a1, b], gold [a1, b, b] -> overlap 2, P = R = 2/3
    assert M.token_f1(["x", "x", "y"], ["x", "y", "y"]) == pytest.approx(2 / 3)


def test_qa_f1_zh_char():
    assert M.qa_f1_zh_char_score("北京。", "北京") == 1.0
    # chars 北,京,市 vs 北,京 -> P = 2/3, R = 1 -> F1 = 0.8
    assert M.qa_f1_zh_char_score("北京市", "北京") == pytest.approx(0.8)


# ---------------------------------------------------------------- ROUGE
def test_rouge_l_official_package_semantics():
    # unique words: hyp {the,cat,sat,on,mat} = 5, ref {the,cat,is,on,mat} = 5; LCS "the cat on the mat"
    # as a set {the,cat,on,mat} = 4 -> R = P = 4/5, F = 2PR/(P+R+1e-8)
    assert M.rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary level: hyp sentences "a b" | "c d" against one ref sentence "a b c d": union LCS = 4 words
    assert M.rouge_l_score("a b. c d", "a b c d") == pytest.approx(1.0, abs=1e-6)
    # empty hypothesis raises inside `rouge`; the official scorer returns 0
    assert M.rouge_l_score("", "a b c") == 0.0


def test_rouge_lsum():
    assert M.rouge_lsum_score("the cat sat", "the cat sat") == pytest.approx(1.0)
    # LCS(a b c d, a b e f) = 2 -> P = R = 1/2
    assert M.rouge_lsum_score("a b c d", "a b e f") == pytest.approx(0.5)


# ---------------------------------------------------------------- classification / retrieval / count / code
def test_classification_score():
    classes = ["Description", "Entity", "Abbreviation", "Human being", "Location"]
    assert M.classification_score("Entity", "Entity", all_classes=classes) == 1.0
    assert M.classification_score("Entity or Location", "Entity", all_classes=classes) == 0.5
    assert M.classification_score("Human being", "Location", all_classes=classes) == 0.0
    assert M.classification_score("no idea", "Location", all_classes=classes) == 0.0  # dead difflib fallback
    # a class that is a substring of the gold answer (but not it) is dropped
    assert M.classification_score("Other location", "Other location",
                                  all_classes=["Other location", "location"]) == 1.0


def test_classification_remove_while_iterating_quirk():
    # matches [loc, location, Other location]; removing "loc" makes the loop skip "location",
    # so it survives: 2 matches remain and the gold gets 1/2 (the intended filter would give 1.0)
    assert M.classification_score("Other location", "Other location",
                                  all_classes=["loc", "location", "Other location"]) == 0.5


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert M.retrieval_score("I do not know", "Paragraph 3") == 0.0
    with pytest.raises(ValueError):
        M.retrieval_score("3", "3")
    assert M.count_score("There are 5 unique, not 6", 5) == 0.5
    assert M.count_score("five", 5) == 0.0
    assert M.count_score("12", "12") == 1.0


def test_code_sim_score():
    # comment lines are skipped: the first clean line is compared
    assert M.code_sim_score("\n# comment\nx = 1\n", "x = 1") == 1.0
    # Indel ratio: 1 - 2/8 = 0.75
    assert M.code_sim_score("abcd", "abce") == 0.75
    # 1 - 1/7 = 85.71% -> fuzzywuzzy rounds to an integer percentage: 86
    assert M.code_sim_score("abc", "abcd") == 0.86
    assert M.code_sim_score("```python", "x = 1") == 0.0  # no qualifying line -> ""


def test_first_line_and_longbench_sample_score():
    assert M.first_line("\n\nfoo\nbar") == "foo"
    # triviaqa takes the first line only, then max over answers
    assert M.longbench_sample_score("triviaqa", "\nParis\nLondon London", ["London", "Paris"]) == 1.0
    assert M.longbench_sample_score("trec", "Entity\nLocation", ["Location"],
                                    ["Entity", "Location"]) == 0.0
    assert M.longbench_sample_score("passage_count", "3", [3]) == 1.0
    with pytest.raises(KeyError, match="known"):
        M.longbench_sample_score("nope", "", [""])


# ---------------------------------------------------------------- SCBench
def test_scbench_scorers():
    s = M.scbench_sample_score
    assert s("scbench_kv", 'The value is "beef-1234".', "beef-1234") == 1.0
    assert s("scbench_kv", "beef", "beef-1234") == 0.0
    assert s("scbench_passkey", "The pass key is 12345.", "12345") == 1.0
    assert s("scbench_passkey", "abc 123 45", "45") == 0.0  # first integer only
    assert s("scbench_vt", "x1 and y", ["X1", "X2"]) == 0.5
    assert s("scbench_qa_eng", "he went to warsaw", ["Warsaw"]) == 1.0
    assert s("scbench_many_shot", "label: positive", "POSITIVE") == 1.0
    assert s("scbench_many_shot", "label: positive", "POSITIVE", scoring="corrected") == 1.0
    assert s("scbench_choice_eng", "B. Paris", ["Paris", "B"]) == 1.0
    assert s("scbench_choice_eng", "The answer is: C", ["Paris", "B"]) == 0.0
    assert s("scbench_choice_eng", "I think the answer is B", ["Paris", "B"]) == 1.0
    assert s("scbench_mf", "The answer is 42.", 42) == 1.0
    assert s("scbench_mf", "3.5", 3.5) == 1.0
    assert s("scbench_mf", "none", 3) == 0.0
    assert s("scbench_qa_chn", "北京", "北京", scoring="corrected") == 1.0
    assert s("scbench_qa_chn", "北京", "北京") == pytest.approx(2 / 3)  # official: per-character labels
    assert s("scbench_summary", "a b c d", "a b e f") == pytest.approx(0.5)


def test_repoqa_similarity():
    fn = "def add(a, b):\n    return a + b"
    other = "def mul(x, y):\n    z = x * y\n    return z"
    needles = [{"name": "add", "needle": fn}, {"name": "mul", "needle": other}]
    out = "Here it is:\n```python\n" + fn + "\n```\n"
    kw = {"lang": "python", "sanitizer": "tree_sitter" if M.tree_sitter_error() is None else "first_block"}
    assert M.extract_code_block(out, **kw).strip() == fn
    assert M.code_bleu_similarity(fn, fn) == pytest.approx(1.0)
    assert M.repoqa_best_match(out, needles, **kw) == ("add", pytest.approx(1.0))
    assert M.repoqa_score(out, "add", needles, **kw) == 1.0
    assert M.repoqa_score(out, "mul", needles, **kw) == 0.0
    with pytest.raises(ValueError, match="language"):
        M.extract_code_block(out, None, "tree_sitter")


# ---------------------------------------------------------------- AIME
def test_extract_boxed():
    assert M.extract_boxed("so \\boxed{\\frac{1}{2}} and finally \\boxed{042}.") == "042"
    assert M.extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert M.extract_boxed("answer \\boxed 7.") == "7"
    assert M.extract_boxed("no box here") is None
    assert M.extract_boxed("cut off \\boxed{12") is None
    assert M.extract_boxed("\\fbox{33}") == "33"


def test_normalize_math_answer():
    assert M.normalize_math_answer("042") == "42"
    assert M.normalize_math_answer("$1,000$") == "1000"
    assert M.normalize_math_answer("3.0") == "3"
    assert M.normalize_math_answer("\\text{ 25 }") == "25"
    assert M.normalize_math_answer("90^\\circ") == "90"
    assert M.normalize_math_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert M.normalize_math_answer(None) is None
    assert M.math_answers_equal("... = \\boxed{40}", "040")
    assert not M.math_answers_equal("the answer is 40", "40", checker="string")  # string check: no box, no credit


def test_pass_at_k():
    assert M.pass_at_k(4, 1, 1) == pytest.approx(0.25)  # = c / n for k = 1
    assert M.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert M.pass_at_k(4, 0, 2) == 0.0
    assert M.pass_at_k(3, 2, 2) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        M.pass_at_k(2, 1, 3)


def test_niah_score_and_mean():
    assert M.niah_score(" 8365622.", "8365622") == 1.0
    assert M.niah_score(" 836562", "8365622") == 0.0
    assert M.mean([1, 0, 0.5]) == 0.5
    assert math.isnan(M.mean([]))


# ------------------------------------------------------------------ lcc / repobench-p: official fuzz.ratio
def _official_ratio(a, b):
    """fuzzywuzzy 0.18 ``fuzz.ratio`` as LongBench's requirements install it (no python-Levenshtein):
    the None / equal / empty checks of its decorators, then difflib's ratio as a rounded percentage."""
    import difflib

    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if len(a) == 0 or len(b) == 0:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def _official_code_sim(prediction, ground_truth):
    kept = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            kept = line
            break
    return _official_ratio(kept, ground_truth) / 100


def _code_pairs(n=3000, seed=0):
    import random

    rng = random.Random(seed)
    vocab = ["self", ".", "(", ")", "x", "=", "return", "if", "for", "in", "range", "len", "[", "]", ":", ",",
             "foo_bar", "0", "1", "None", " ", "  ", "+", "-", "'", '"', "get", "append", "items", "dict", "np"]

    def line(k):
        return "".join(rng.choice(vocab) for _ in range(k))

    def mutate(s):
        s = list(s)
        for _ in range(rng.randint(0, 6)):
            op = rng.random()
            i = rng.randrange(len(s) + 1)
            if op < 0.4 and s:
                del s[min(i, len(s) - 1)]
            elif op < 0.8:
                s.insert(i, rng.choice("abcxyz_().= "))
            elif s:
                s[min(i, len(s) - 1)] = rng.choice("0123")
        return "".join(s)

    for _ in range(n):
        gold = line(rng.randint(1, 90))  # long ones (> 200 chars) exercise difflib's autojunk
        pred = mutate(gold) if rng.random() < 0.8 else line(rng.randint(0, 40))
        r = rng.random()
        if r < 0.15:
            pred = "# a comment\n" + pred + "\nmore()"
        elif r < 0.25:
            pred = "\n\n```python\n" + pred
        elif r < 0.3:
            pred = "// x\n`y`"  # no line qualifies: "" is compared
        yield pred, gold


def test_code_sim_equals_official_fuzzywuzzy_formula_on_many_pairs():
    pairs = list(_code_pairs())
    ours = [M.code_sim_score(p, g) for p, g in pairs]
    official = [_official_code_sim(p, g) for p, g in pairs]
    assert ours == official
    # the rapidfuzz / python-Levenshtein ratio is another number on many of these pairs
    lev = [M.code_sim_score(p, g, backend="levenshtein") for p, g in pairs]
    assert sum(a != b for a, b in zip(lev, official)) > len(pairs) // 10
    assert M.code_sim_score("", "") == 1.0 and M.code_sim_score("# only a comment", "") == 1.0
    assert M.fuzzywuzzy_ratio(None, "x") == 0 and M.fuzzywuzzy_ratio("", "x") == 0
    assert M.longbench_sample_score("lcc", pairs[0][0], [pairs[0][1]]) == official[0]


def test_code_sim_matches_fuzzywuzzy_when_installed():
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if getattr(fuzz.SequenceMatcher, "__module__", "") != "difflib":
        pytest.skip("fuzzywuzzy runs on python-Levenshtein here, not the official difflib backend")
    for p, g in list(_code_pairs(800, seed=1)):
        line = next((ln for ln in p.lstrip("\n").split("\n") if not any(c in ln for c in ("`", "#", "//"))), "")
        assert M.fuzzywuzzy_ratio(line, g) == fuzz.ratio(line, g)
