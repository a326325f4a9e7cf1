"""`ModelRunner`: packs a scheduled batch into one flattened forward pass and returns logits."""

from __future__ import annotations

import torch

from ..layers.rotary import rope_cos_sin
from ..models.decoder import CausalLM, ForwardContext, SeqSlice
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, method, device: torch.device):
        self.model = model
        self.method = method
        self.device = device
        self.spec = model.spec

    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Process `n` new tokens of each sequence. Returns the sequences whose last token was
        processed (they sample next) and their logits [len, vocab] (float32)."""
        ids, pos, slices, rows, samplers = [], [], [], [], []
        start = 0
        for seq, n in batch:
            c = seq.num_computed
            ids.extend(seq.token_ids[c : c + n])
            pos.extend(range(c, c + n))
            slices.append(SeqSlice(seq, start, start + n))
            start += n
            if c + n == seq.num_tokens:
                rows.append(start - 1)
                samplers.append(seq)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        cos, sin = rope_cos_sin(self.spec.inv_freq.to(self.device), positions, self.spec.rope_attention_scaling)
        ctx = ForwardContext(slices, positions, cos, sin, self.method, all_decode=all(n == 1 for _, n in batch))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, ctx, torch.tensor(rows, dtype=torch.long, device=self.device))
        return samplers, logits
