"""A character-level tokenizer built locally (nothing downloaded) for conftest's tiny random models
(vocab 256): <unk>=0, BOS <s>=1, EOS </s>=2 (the tiny models' bos/eos ids), a few chat markers, then
one token per printable ASCII character and the newline. ``add_bos`` makes plain encoding prepend BOS
(as Llama tokenizers do); ``chat_template`` is stored with it (e.g. one that emits BOS itself)."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
# Llama-3-like: the template itself starts with the BOS token
BOS_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_char_tokenizer(path: str | Path | None = None, chat_template: str | None = None, add_bos: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=SPECIALS[3:])
    if chat_template:
        fast.chat_template = chat_template
    if path is not None:
        fast.save_pretrained(str(path))
    return fast
