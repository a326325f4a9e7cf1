"""deltakv-pack: sources, packing with separators, held-out split, content-hash reuse, errors."""

import json
import random
import sys

import pytest

from data_prepare import PackConfig, SourceConfig, pack_dataset
from data_prepare.pack import main as pack_main
from deltakv.testing import make_tokenizer

DOCS_A = ["the cat sat on the mat", "a dog ran in the park\nand it was happy"]
DOCS_B = ["one two three four five six", "people said it was new", "after the first year they had more time"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return make_tokenizer(d, DOCS_A + DOCS_B), d


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(DOCS_A))
    (folder / "b.txt").write_text("\n\n".join(DOCS_B))
    return folder


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.eos_token_id, self.backend_tokenizer = inner.eos_token_id, inner.backend_tokenizer

    def __call__(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)


def test_pack_text_by_hand(tok, corpus, tmp_path):
    tokenizer, _ = tok
    cfg = PackConfig(name="t", sources=[SourceConfig(type="text", path=str(corpus))], seq_len=5,
                     eval_fraction=0.2, seed=3, cache_dir=str(tmp_path / "cache"))
    dd, folder = pack_dataset(cfg, tokenizer)
    docs = DOCS_A + DOCS_B  # files sorted, blank-line separated documents
    order = list(range(5))
    random.Random(3).shuffle(order)
    eos = tokenizer.eos_token_id
    stream = lambda idx: [t for i in idx for t in tokenizer(docs[i], add_special_tokens=False)["input_ids"] + [eos]]
    train, val = stream(order[:4]), stream(order[4:])
    assert dd["train"]["input_ids"] == [train[i:i + 5] for i in range(0, len(train) - 4, 5)]
    assert dd["validation"]["input_ids"] == [val[i:i + 5] for i in range(0, len(val) - 4, 5)]
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("t-")
    meta = json.loads((folder / "pack_meta.json").read_text())
    assert meta["documents"] == 5 and meta["eval_documents"] == 1


def test_content_hash_reuse_and_invalidation(tok, corpus, tmp_path):
    tokenizer, _ = tok
    cfg = PackConfig(sources=[SourceConfig(type="text", path=str(corpus))], seq_len=4, eval_fraction=0.0,
                     cache_dir=str(tmp_path / "cache"))
    counting = CountingTokenizer(tokenizer)
    dd1, f1 = pack_dataset(cfg, counting)
    assert counting.calls > 0
    counting.calls = 0
    dd2, f2 = pack_dataset(cfg, counting)  # same inputs: loaded from disk, not re-tokenized
    assert counting.calls == 0 and f1 == f2 and dd1["train"]["input_ids"] == dd2["train"]["input_ids"]
    (corpus / "b.txt").write_text("\n\n".join(DOCS_B + ["more text here"]))
    _, f3 = pack_dataset(cfg, counting)
    assert f3 != f1 and counting.calls > 0
    _, f4 = pack_dataset(PackConfig(**{**cfg.__dict__, "seq_len": 3}), counting)
    assert f4 not in (f1, f3)


def test_jsonl_and_saved_dataset_sources(tok, tmp_path):
    tokenizer, _ = tok
    from datasets import Dataset, DatasetDict

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS_B) + "\n")
    cfg = PackConfig(sources=[SourceConfig(type="jsonl", path=str(tmp_path / "d.jsonl"), text_field="body")],
                     seq_len=4, eval_fraction=0.0, shuffle=False, cache_dir=str(tmp_path / "c"))
    dd, _ = pack_dataset(cfg, tokenizer)
    first = tokenizer(DOCS_B[0], add_special_tokens=False)["input_ids"]
    assert dd["train"]["input_ids"][0] == first[:4]
    DatasetDict({"train": Dataset.from_dict({"text": DOCS_A})}).save_to_disk(str(tmp_path / "saved"))
    cfg2 = PackConfig(sources=[SourceConfig(type="hf_disk", path=str(tmp_path / "saved"))], seq_len=3,
                      eval_fraction=0.0, shuffle=False, cache_dir=str(tmp_path / "c"))
    dd2, _ = pack_dataset(cfg2, tokenizer)
    assert dd2["train"]["input_ids"][0] == tokenizer(DOCS_A[0], add_special_tokens=False)["input_ids"][:3]
    bad = PackConfig(sources=[SourceConfig(type="jsonl", path=str(tmp_path / "d.jsonl"))], cache_dir=str(tmp_path))
    with pytest.raises(KeyError, match="no field 'text'.*set text_field"):
        pack_dataset(bad, tokenizer)


def test_bad_inputs_are_clear_errors(tok, tmp_path):
    tokenizer, _ = tok
    missing = PackConfig(sources=[SourceConfig(type="text", path=str(tmp_path / "nowhere"))], cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack_dataset(missing, tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack_dataset(PackConfig(sources=[SourceConfig(type="hf_disk", path=str(tmp_path / "x"))]), tokenizer)
    (tmp_path / "short.txt").write_text("tiny doc")
    short = PackConfig(sources=[SourceConfig(type="text", path=str(tmp_path / "short.txt"))], seq_len=64,
                       eval_fraction=0.0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack_dataset(short, tokenizer)
    with pytest.raises(ValueError, match="needs a path"):
        SourceConfig(type="jsonl")
    with pytest.raises(ValueError, match="Unknown data fields"):
        PackConfig.from_dict({"seqlen": 4})


def test_deltakv_pack_cli(tok, corpus, tmp_path, monkeypatch, capsys):
    _, tok_dir = tok
    (tok_dir / "config.json").write_text("{}")  # resolve_model_path only checks for a model folder
    monkeypatch.setattr(sys, "argv", [
        "deltakv-pack", "data=text", f"data.sources.0.path={corpus}", "data.seq_len=4", "data.eval_fraction=0.2",
        f"data.cache_dir={tmp_path / 'cache'}", f"model.path={tok_dir}", f"hydra.run.dir={tmp_path / 'run'}",
    ])
    pack_main()
    out = capsys.readouterr().out
    assert "packed dataset:" in out and "train" in out and "validation" in out
    assert len(list((tmp_path / "cache").glob("text-*"))) == 1
