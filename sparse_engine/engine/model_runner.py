"""`ModelRunner`: turns a scheduled batch into a `StepPlan`, lets the cache method prepare it, runs
the decoder once on the flattened batch and returns the logits of the rows that sample."""

from __future__ import annotations

import torch

from ..models.decoder import CausalLM, ForwardContext, SeqSlice
from .sequence import Sequence
from .step_plan import StepPlan, build_plan


class ModelRunner:
    def __init__(self, model: CausalLM, method, device: torch.device):
        self.model = model
        self.method = method
        self.device = device
        self.spec = model.spec

    def prepare(self, batch: list[tuple[Sequence, int]]) -> StepPlan:
        """The step plan: flat tokens, positions, RoPE, row groups; then the method allocates the
        step's slots in every layer and builds the read tables (batched methods), or the per-sequence
        context is attached (methods still on the per-sequence hooks)."""
        plan = build_plan(batch, self.spec, self.device, prefill_together=self.method.prefill_together)
        plan.method = self.method
        plan.batched = self.method.batched(plan)
        if plan.batched:
            self.method.begin_step(plan)
        else:
            slices = [SeqSlice(seq, plan.cu[b], plan.cu[b + 1]) for b, seq in enumerate(plan.seqs)]
            plan.ctx = ForwardContext(slices, plan.positions, plan.cos, plan.sin, self.method, plan.all_decode)
        return plan

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Process `n` new tokens of each sequence. Returns the sequences whose last token was
        processed (they sample next) and their logits [len, vocab] (float32)."""
        plan = self.prepare(batch)
        try:
            logits = self.model(plan.input_ids, plan)
        finally:  # also on an interrupt: per-step resources (scratch slots) go back
            if plan.batched:
                self.method.end_step(plan)
        return plan.samplers, logits
