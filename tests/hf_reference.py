"""Independent references built on HF transformers (its own SDPA attention) for engine tests."""

from __future__ import annotations

import torch


def load_hf(path, dtype=torch.float32, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int):
    """Greedy token ids from HF `generate`, with every step's logits."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    toks = out.sequences[0, len(prompt_ids):].tolist()
    return toks, [l[0].float() for l in out.logits]


def first_divergence_is_tie(engine_tokens, hf_tokens, hf_logits, tol: float = 1e-3) -> tuple[bool, str]:
    """True if the sequences agree, or first differ at a step where HF's top-2 logit margin < tol."""
    for i, (a, b) in enumerate(zip(engine_tokens, hf_tokens)):
        if a != b:
            top2 = torch.topk(hf_logits[i], 2).values
            margin = float(top2[0] - top2[1])
            return margin < tol, f"step {i}: engine {a} vs HF {b}, HF top-2 margin {margin:.2e}"
    if len(engine_tokens) != len(hf_tokens):
        return False, f"lengths differ: {len(engine_tokens)} vs {len(hf_tokens)}"
    return True, "identical"
