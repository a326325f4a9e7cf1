"""`StepPlan`: one scheduler step, prepared on the host once and copied to the device once.

The scheduler's batch [(seq, n new tokens)] becomes flat tensors of all its tokens (ids, positions,
RoPE tables), row groups for attention (decode rows together, prefill chunks together, each a padded
[G, n] block), and - filled by the cache method in `begin_step` - the slots every new token is
written to in every layer and the read tables of every group. Layers then run one write and one
attention call per group on the whole batch (nano-vllm's `prepare_prefill` / `prepare_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers.rotary import rope_cos_sin


@dataclass
class RowGroup:
    """Sequences attended together: G sequences, each with up to `n` query rows (padded).

    rows [G, n]: flat batch row of each query (padding repeats a sequence's last row);
    valid [G, n]: which entries are real; bidx: the sequences' indices in the step's batch.
    table [G, L, Hkv, T] / lens [G, L, Hkv] (device) / lens_host: the read tables, set by the method.
    """

    bidx: list[int]
    n: int
    rows: torch.Tensor
    valid: torch.Tensor | None  # None: every entry is real (decode group, or equal chunk lengths)
    flat_rows: torch.Tensor | None  # rows[valid] (None when rows cover the batch in order)
    q_pos: torch.Tensor  # [G, n]
    decode: bool
    table: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    lens_host: torch.Tensor | None = None
    # prefill, per layer: every table holds positions 0..T-1 in order, same n and T (set by the method;
    # None: the group's chunks end at different positions or decode, so no layer is)
    dense_layers: list[bool] | None = None
    per_layer: list | None = None  # [(table, lens, valid) of each layer]: unbound once per step
    kv_valid: torch.Tensor | None = None  # [G, L, Hkv, T] entries < lens: decode masks, built once per step

    @property
    def size(self) -> int:
        return len(self.bidx)


@dataclass
class StepPlan:
    seqs: list  # Sequence, in batch order
    num_new: list[int]
    starts: list[int]  # num_computed of each sequence before this step
    cu: list[int]  # row offsets of each sequence in the flat batch (len B + 1)
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    cos: torch.Tensor  # [N, D]
    sin: torch.Tensor
    logit_rows: torch.Tensor  # rows whose logits are sampled
    samplers: list  # the sequences of those rows
    all_decode: bool
    groups: list[RowGroup] = field(default_factory=list)
    write_slots: torch.Tensor | None = None  # [L, N * Hkv]: slot of (token, head) in every layer
    write_slots_l: tuple | None = None  # write_slots.unbind(0), made at the first layer
    batched: bool = True  # False: this step runs the method's per-sequence hooks
    method: object = None  # the CacheMethod
    method_data: object = None  # a method's per-step tensors (e.g. OmniKV's selection)
    ctx: object = None  # per-sequence path only: the decoder's ForwardContext

    rope: tuple | None = None  # (cos, signed sin) [N, 1, 2, D/2] in the model dtype: `apply_rope_fast`

    @property
    def num_rows(self) -> int:
        return self.cu[-1]

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> None:
        from ..layers.rotary import rope_tables

        self.cos, self.sin = cos, sin
        self.rope = rope_tables(cos, sin, dtype)


def _group(bidx: list[int], plan_cu: list[int], positions: torch.Tensor, decode: bool, device) -> RowGroup:
    lens = [plan_cu[b + 1] - plan_cu[b] for b in bidx]
    n = max(lens)
    if decode or all(x == n for x in lens):
        rows = torch.tensor([[plan_cu[b] + j for j in range(n)] for b in bidx], dtype=torch.long)
        valid = None
    else:
        rows = torch.tensor([[plan_cu[b] + min(j, l - 1) for j in range(n)] for b, l in zip(bidx, lens)],
                            dtype=torch.long)
        valid = torch.tensor([[j < l for j in range(n)] for l in lens])
    covers = bidx == list(range(len(plan_cu) - 1)) and valid is None
    rows_dev = rows.to(device)
    valid_dev = None if valid is None else valid.to(device)
    flat = None if covers else (rows_dev.reshape(-1) if valid is None else rows_dev[valid_dev])
    return RowGroup(bidx, n, rows_dev, valid_dev, flat, positions[rows_dev], decode)


def build_plan(batch, spec, device, split_groups: bool = True, prefill_together: bool = False) -> StepPlan:
    """Flatten the scheduler's batch [(seq, n)] into one step plan (host work, one copy per tensor)."""
    ids, pos, cu, logit_rows, samplers = [], [], [0], [], []
    for seq, n in batch:
        c = seq.num_computed
        ids.extend(seq.token_ids[c : c + n])
        pos.extend(range(c, c + n))
        cu.append(cu[-1] + n)
        if c + n == seq.num_tokens:
            logit_rows.append(cu[-1] - 1)
            samplers.append(seq)
    positions = torch.tensor(pos, dtype=torch.long).to(device)
    cos, sin = rope_cos_sin(spec.inv_freq.to(device), positions, spec.rope_attention_scaling)
    all_decode = all(n == 1 for _, n in batch)
    plan = StepPlan(
        seqs=[s for s, _ in batch], num_new=[n for _, n in batch], starts=[s.num_computed for s, _ in batch], cu=cu,
        input_ids=torch.tensor(ids, dtype=torch.long).to(device), positions=positions, cos=cos, sin=sin,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long).to(device), samplers=samplers, all_decode=all_decode,
    )
    # Decode rows attend as one [B, 1] group. Each prefill chunk is its own group: chunks of different
    # lengths padded into one [G, n] block cost more than they save on CPU (explicit masks over the
    # padding, no causal fast path), and a step holds few chunks (max_num_batched_tokens /
    # chunk_prefill_size); on CUDA a varlen kernel would take them all in one call.
    if split_groups:
        dec = [b for b, (s, n) in enumerate(batch) if n == 1]
        pre = [b for b, (s, n) in enumerate(batch) if n != 1]
    else:
        dec, pre = [], list(range(len(batch)))
    if dec:
        plan.groups.append(_group(dec, cu, positions, True, device))
    for part in ([pre] if prefill_together and pre else [[b] for b in pre]):
        plan.groups.append(_group(part, cu, positions, False, device))
    return plan
