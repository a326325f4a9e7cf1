"""`streaming`: attention sinks + a ring buffer of recent tokens per layer (StreamingLLM / DoubleSparse++).

Layer l keeps `budget_l` tokens per KV head: the first `sink_size` tokens and a ring of the
`budget_l - sink_size` most recent ones. A query at position p reads exactly
`{sink} U (p - ring, p]`; tokens keep their original positions (RoPE is baked into cached keys).

Memory is independent of length and updates are O(1) per token: once a layer's ring is full, a new
token overwrites the ring's oldest slot IN PLACE (same slot id; pool k/v/pos rewritten), so
`slots_needed` is 0 for a decode step of a full sequence. A prefill chunk of n tokens is attended with
the sink + window mask over (cache U chunk) before it is folded into the ring, so chunked and
unchunked prefill give the same result; only the last `ring` tokens of a chunk are ever kept.
Budgets may decay exponentially with depth: `budget_l = max(min_budget, budget * budget_decay**l)`.

Batch hooks (every step runs batched). `begin_step` decides on the host, once per step and for every
(token, layer) of the batch, where the token goes: a fresh slot (the layer's table is not full yet;
all fresh slots of the step come from ONE pool allocation), an existing ring slot (column
`sink + (ptr + i) % ring` of the table, copied first if a fork still shares it), or nowhere (an
overflow token a later token of the same chunk overwrites: it is written to one scratch slot). That
fills `plan.write_slots`, so each layer writes K/V with one scatter. Decode rows (and chunks that fit)
read their tables with plain length masks: after the in-place overwrite a table holds exactly the
window. A prefill chunk that overflows a layer's ring ("windowed" layer) gathers the cached K/V of its
group BEFORE the layer's write, then attends over (cache U chunk) with the sink + window mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layers.attention_ops import gather_kv
from ..models.spec import ModelSpec
from .base import BatchView, CacheMethod, MethodConfig
from .budgets import exp_decay_budgets, uniform_budgets


@dataclass
class StreamingConfig(MethodConfig):
    """Knobs of `streaming`.

    Attributes:
        budget: tokens per KV head of layer 0 (sink + ring); every layer when budget_decay is None.
        sink_size: first tokens always kept.
        budget_decay: None (uniform) or d in (0, 1]: budget_l = max(min_budget, floor(budget * d**l)).
        min_budget: floor of decayed budgets (default sink_size + 1: a ring of at least one token).
        mode: "rolling" (ours: windowed prefill, a ring of recent tokens during decode) | "once"
            (kvpress's StreamingLLMPress: full-attention prefill, ONE eviction after the prompt to sink +
            most recent tokens, then decode grows; `streaming_once.py`).
        compression_ratio: mode "once" only, kvpress's convention instead of `budget`: r in [0, 1),
            each KV head keeps int(T * (1 - r)) of a T-token prompt, sinks included.
    """

    budget: int = 512
    sink_size: int = 4
    budget_decay: float | None = None
    min_budget: int | None = None
    mode: str = "rolling"
    compression_ratio: float | None = None

    def validate(self, spec: ModelSpec) -> None:
        if self.mode not in ("rolling", "once"):
            raise ValueError(f"streaming mode must be 'rolling' (ours, default) or 'once' (kvpress: full prefill, "
                             f"one eviction after the prompt, decode grows), got {self.mode!r}")
        if self.compression_ratio is not None:
            r = self.compression_ratio
            if self.mode != "once":
                raise ValueError("compression_ratio (kvpress) sizes the one eviction after the prompt: it needs "
                                 "mode='once' (the rolling ring has a fixed budget)")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise ValueError(f"compression_ratio must be in [0, 1), got {r!r}")
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise ValueError(f"budget must be a positive int (tokens per KV head and layer), got {self.budget!r}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.sink_size >= self.budget:
            raise ValueError(f"sink_size ({self.sink_size}) must be smaller than budget ({self.budget}): "
                             "the recent-token ring needs at least one slot")
        if self.budget_decay is not None and not 0.0 < self.budget_decay <= 1.0:
            raise ValueError(f"budget_decay must be in (0, 1] (or None for uniform budgets), got {self.budget_decay}")
        if self.min_budget is not None and not self.sink_size < self.min_budget <= self.budget:
            raise ValueError(f"min_budget must lie in (sink_size, budget] = ({self.sink_size}, {self.budget}], "
                             f"got {self.min_budget}")

    def layer_budgets(self, num_layers: int) -> list[int]:
        if self.budget_decay is None:
            return uniform_budgets(self.budget, num_layers)
        floor = self.min_budget if self.min_budget is not None else self.sink_size + 1
        return exp_decay_budgets(self.budget, num_layers, self.budget_decay, floor)


@dataclass
class RingState:
    """Per sequence (host tensors [L], one entry per layer).

    ptr: ring offset of the oldest recent token. cow: after a fork, how many ring offsets from `ptr`
    on may still hold slots shared with the other side (None: nothing shared). pending: the
    per-sequence path only: a chunk's K/V held back until its attention ran (layer -> (k, v, pos)).
    """

    ptr: torch.Tensor
    cow: torch.Tensor | None = None
    pending: dict | None = None
    extra: dict = field(default_factory=dict)

    # A method composed over this one (`sparsex_over(StreamingCache)`) keeps its own entries in
    # `seq.kv.state` as in a dict: they live in `extra`.
    def __getitem__(self, key):
        return self.extra[key]

    def __setitem__(self, key, value) -> None:
        self.extra[key] = value

    def __contains__(self, key) -> bool:
        return key in self.extra

    def get(self, key, default=None):
        return self.extra.get(key, default)

    def pop(self, key, *default):
        return self.extra.pop(key, *default)

    def setdefault(self, key, default=None):
        return self.extra.setdefault(key, default)


@dataclass
class _StepWindow:
    """A step's prefill group when some layer's ring overflows: which layers attend windowed, and the
    group's cached keys (positions, validity) as they were BEFORE the step's writes, chunk appended."""

    group: object  # the RowGroup of the prefill chunks
    layers: list[bool]  # per layer: attend over (cache U chunk) with the sink + window mask
    t_cache: int  # cached columns read (the longest pre-step table of the group)
    kpos: torch.Tensor  # [G, L, Hkv, t_cache + n] positions: cached slots, then the chunk
    valid: torch.Tensor  # [G, L, Hkv, t_cache + n]
    lens: torch.Tensor  # [G, L, Hkv] cached tokens before the step


class StreamingCache(CacheMethod):
    name = "streaming"
    Config = StreamingConfig

    def __new__(cls, config=None, *args, **kwargs):
        """mode='once' serves kvpress's convention (streaming_once.StreamingOnceCache, same knobs)."""
        if cls is StreamingCache and getattr(config, "mode", "rolling") == "once":
            from .streaming_once import StreamingOnceCache

            obj = StreamingOnceCache.__new__(StreamingOnceCache)
            obj.__init__(config, *args, **kwargs)  # not a StreamingCache: Python does not call __init__ again
            return obj
        return super().__new__(cls)

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        self.budgets = self.config.layer_budgets(spec.num_layers)
        self.rings = [b - self.config.sink_size for b in self.budgets]
        self._budget_t = torch.tensor(self.budgets, dtype=torch.long)
        self._ring_t = torch.tensor(self.rings, dtype=torch.long)
        self._trash = None  # this step's scratch slot for overflow tokens that are never kept

    def batched(self, plan) -> bool:
        return True

    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state = RingState(ptr=torch.zeros(self.spec.num_layers, dtype=torch.long))

    # ------------------------------------------------------------------ scheduling
    def _held(self, seq) -> torch.Tensor:
        """Tokens held per layer [L] (every KV head holds the same number)."""
        kv = getattr(seq, "kv", None) if seq is not None else None
        return kv.lens[:, 0] if kv is not None else torch.zeros(self.spec.num_layers, dtype=torch.long)

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        held = self._held(seq)
        fresh = torch.minimum((self._budget_t - held).clamp(min=0), torch.tensor(num_new_tokens))
        need = int(fresh.sum())
        kv = getattr(seq, "kv", None) if seq is not None else None
        cow = kv.state.cow if kv is not None else None
        if cow is not None:  # after a fork, ring overwrites may copy shared slots first (upper bound)
            need += int(cow.clamp(max=num_new_tokens).sum())
        # one scratch slot per step takes the tokens a chunk overflows and never keeps (upper bound)
        scratch = num_new_tokens > 1 and bool((num_new_tokens > fresh).any())
        return need * self.spec.num_kv_heads + int(scratch)

    def fork(self, src, dst) -> None:
        """Share the ring with a fork; both sides then copy a shared slot before overwriting it."""
        super().fork(src, dst)
        for s in (src, dst):
            s.kv.state.cow = self._ring_t.clone()

    def max_slots(self, num_tokens: int) -> int:
        scratch = num_tokens > min(self.budgets)  # a chunk may overflow a ring: one scratch slot
        return sum(min(num_tokens, b) for b in self.budgets) * self.spec.num_kv_heads + int(scratch)

    def expected_kv_tokens(self, num_tokens: int) -> int:
        return sum(min(num_tokens, b) for b in self.budgets) * self.spec.num_kv_heads

    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        self._free_trash()

    def release(self, seq) -> None:
        self._free_trash()  # a step interrupted after begin_step (abort_all) must not keep it
        super().release(seq)

    def _free_trash(self) -> None:
        if self._trash is not None:
            self.pool.free(self._trash)
            self._trash = None

    # ------------------------------------------------------------------ batch hooks
    def begin_step(self, plan) -> None:
        """Place every new (token, layer) of the batch: fresh slot, ring slot (in place) or scratch;
        fill `plan.write_slots`, the tables, ring pointers and slot positions; build the read tables.

        Host work vectorised over the batch's [N tokens, L layers]; device work is a few ops per
        sequence (its table) plus a few per step, whatever the number of layers."""
        self._free_trash()
        pool, dev = self.pool, self.pool.device
        L, H, S, N = self.spec.num_layers, self.spec.num_kv_heads, self.config.sink_size, plan.num_rows
        seqs, B = plan.seqs, len(plan.seqs)
        rings = self._ring_t
        n = torch.tensor(plan.num_new, dtype=torch.long)
        held = torch.stack([s.kv.lens[:, 0] for s in seqs])  # [B, L] tokens held before the step
        ptr = torch.stack([s.kv.state.ptr for s in seqs])
        a = torch.minimum((self._budget_t - held).clamp(min=0), n[:, None])  # fresh tokens per layer
        r = n[:, None] - a  # overflow tokens: ring overwrites, in order
        m = torch.minimum(r, rings)  # ... of which the last m survive the chunk
        tok = torch.repeat_interleave(torch.arange(B), n)  # [N]: the sequence of each row
        j = torch.arange(N) - torch.tensor(plan.cu[:-1], dtype=torch.long)[tok]  # row index in its chunk
        i = j[:, None] - a[tok]  # [N, L]: overflow index (< 0: a fresh token)
        fresh = i < 0
        keep = i >= (r - m)[tok]  # surviving overflow tokens
        col = torch.where(fresh, held[tok] + j[:, None], S + (ptr[tok] + i) % rings)  # table column
        # a fresh token whose column a surviving overflow token of the same chunk rewrites is never
        # kept either: its slot goes to the survivor (the table was not full, so ptr == 0 here)
        rt_ = r[tok]
        rewritten = fresh & (col >= S) & (rt_ > 0) & ((m[tok] == rings) | ((col - S - ptr[tok]) % rings < rt_))
        drop = ~(fresh | keep) | rewritten
        # token-major order: each sequence's entries are contiguous
        ft, fl = fresh.nonzero(as_tuple=True)  # every fresh column gets a slot ...
        fw = (fresh & ~rewritten)[ft, fl]  # ... written by its own token unless rewritten
        rt, rl = keep.nonzero(as_tuple=True)
        rcol = col[rt, rl]
        dt, dl = drop.nonzero(as_tuple=True)
        foff, roff = [0] + a.sum(1).cumsum(0).tolist(), [0] + m.sum(1).cumsum(0).tolist()
        fidx = fw.nonzero().squeeze(1)
        idx = torch.cat([fl, col[ft, fl], fidx, fl[fidx], ft[fidx], rl, rt, rcol, dl, dt]).to(dev)
        fl_d, fcol_d, fidx_d, fwl_d, fwt_d, rl_d, rt_d, rcol_d, dl_d, dt_d = idx.split(
            [len(ft)] * 2 + [len(fidx)] * 3 + [len(rt)] * 3 + [len(dt)] * 2)
        heads = torch.arange(H, device=dev)[None, :]

        # copy-on-write (only while a fork may still share ring slots): which old targets are shared
        cow_seqs = [b for b, s in enumerate(seqs) if s.kv.state.cow is not None]
        shared = None
        if cow_seqs:
            cow = torch.zeros(B, L, dtype=torch.long)
            for b in cow_seqs:
                cow[b] = seqs[b].kv.state.cow
            ri = i[rt, rl]
            cand = ((rcol < held[tok[rt], rl]) & (ri % rings[rl] < cow[tok[rt], rl])).nonzero().squeeze(1)
            if len(cand):
                cand_d, owner = cand.to(dev), tok[rt[cand]]
                targets = torch.cat([seqs[b].kv.slots[rl_d[cand_d[sel], None], heads, rcol_d[cand_d[sel], None]]
                                     for b, sel in self._runs(owner)])  # [C, H]
                ce, ch = (pool.refcount[targets] > 1).cpu().nonzero(as_tuple=True)  # one sync, after a fork only
                if len(ce):
                    shared = (targets, cand_d, owner[ce], ce.to(dev), ch.to(dev))
            for b in cow_seqs:
                left = (cow[b] - r[b]).clamp(min=0)
                seqs[b].kv.state.cow = left if bool(left.any()) else None

        n_fresh, n_cow = len(ft) * H, 0 if shared is None else len(shared[2])
        scratch = bool(len(dt))
        total = n_fresh + n_cow + int(scratch)
        new = pool.allocate(total) if total else None

        if n_cow:
            targets, cand_d, owner, ce, ch = shared
            old, copy = targets[ce, ch], new[n_fresh : n_fresh + n_cow]
            for t in (pool.k, pool.v, pool.pos):
                t.index_copy_(0, copy, t[old])
            e = cand_d[ce]
            for b, sel in self._runs(owner):
                seqs[b].kv.slots[rl_d[e[sel]], ch[sel], rcol_d[e[sel]]] = copy[sel]
            pool.free(old)  # drop this side's reference; the other owner keeps the slot

        # fresh slots go to their columns (per-layer counts differ); then read the ring targets
        fresh_slots = new[:n_fresh].view(-1, H) if n_fresh else None
        need = (held + a).max(1).values.tolist()
        new_ptr = (ptr + r) % rings
        ring_slots = []
        for b, s in enumerate(seqs):
            kv = s.kv
            if foff[b + 1] > foff[b]:
                sl = slice(foff[b], foff[b + 1])
                kv.grow(need[b])
                kv.slots[fl_d[sl, None], heads, fcol_d[sl, None]] = fresh_slots[sl]
                kv.lens += a[b][:, None]
            if roff[b + 1] > roff[b]:
                sl = slice(roff[b], roff[b + 1])
                ring_slots.append(kv.slots[rl_d[sl, None], heads, rcol_d[sl, None]])
                kv.state.ptr.copy_(new_ptr[b])

        write = torch.empty(L, N, H, dtype=torch.long, device=dev)
        if len(fidx):
            write[fwl_d, fwt_d] = fresh_slots[fidx_d]
        if ring_slots:
            write[rl_d, rt_d] = torch.cat(ring_slots)
        if scratch:
            self._trash = new[-1:]
            write[dl_d, dt_d] = self._trash[0]
        plan.write_slots = write.view(L, N * H)
        self.build_tables(plan)
        # per prefill group: its windowed layers and pre-step keys (read before the write below)
        plan.method_data = [w for w in (self._window(plan, g, held, r) for g in plan.groups if not g.decode) if w]
        pool.pos.index_copy_(0, plan.write_slots.reshape(-1), plan.positions[None, :, None].expand(L, N, H).reshape(-1))

    @staticmethod
    def _runs(owner: torch.Tensor):
        """(value, slice) of each run of equal values in a sorted host tensor."""
        vals, counts = torch.unique_consecutive(owner, return_counts=True)
        start = 0
        for v, c in zip(vals.tolist(), counts.tolist()):
            yield v, slice(start, start + c)
            start += c

    def _window(self, plan, group, held: torch.Tensor, r: torch.Tensor) -> _StepWindow | None:
        """A prefill group's windowed layers (a chunk overflows the ring) and its pre-step keys."""
        layers = (r[group.bidx] > 0).any(0).tolist()
        if not any(layers):
            return None
        G, n = group.rows.shape
        L, H, dev = self.spec.num_layers, self.spec.num_kv_heads, self.pool.device
        pre = held[group.bidx]  # [G, L] tokens cached before this step
        t = int(pre.max())
        kpos = self.pool.pos[group.table[..., :t]]  # [G, L, Hkv, t]
        cached = torch.arange(t)[None, None, :] < pre[:, :, None]  # [G, L, t]
        chunk = torch.arange(n)[None, :] < torch.tensor([plan.num_new[b] for b in group.bidx])[:, None]  # [G, n]
        valid = torch.cat([cached, chunk[:, None, :].expand(G, L, n)], 2).to(dev)[:, :, None, :].expand(G, L, H, t + n)
        kpos = torch.cat([kpos, group.q_pos[:, None, None, :].expand(G, L, H, n)], 3)
        lens = pre.to(dev)[:, :, None].expand(G, L, H)
        return _StepWindow(group, layers, t, kpos, valid, lens)

    def forward_layer(self, plan, layer, q, k, v, k_pre):
        wins = {id(w.group): w for w in (plan.method_data or ()) if w.layers[layer]}
        if not wins:
            return super().forward_layer(plan, layer, q, k, v, k_pre)
        cached = {}
        for gid, win in wins.items():
            table = win.group.table[:, layer, :, : win.t_cache]
            cached[gid] = (self.pool.k[table], self.pool.v[table])  # before this layer's ring overwrites
        self.write_layer(plan, layer, k, v, k_pre)
        if len(plan.groups) == 1 and plan.groups[0].flat_rows is None:
            win = wins[id(plan.groups[0])]
            return self._attend_chunk(plan, layer, win, q, k, v, *cached[id(win.group)])
        out = torch.empty_like(q)
        for group in plan.groups:  # the decode rows (plain) and the prefill chunks (windowed or plain)
            win = wins.get(id(group))
            o = (self._attend_chunk(plan, layer, win, q, k, v, *cached[id(group)]) if win is not None
                 else self._attend(plan, layer, group, q))
            out.index_copy_(0, group.flat_rows, o)
        return out

    def _attend_chunk(self, plan, layer, win: _StepWindow, q, k, v, k_cache, v_cache):
        """Prefill chunks of one group over (their pre-step cache U the chunk itself) with the sink +
        window mask: q [N, Hq, D] flat; k_cache / v_cache [G, Hkv, t, D]. Returns [rows, Hq, D]."""
        group = win.group
        G, n = group.rows.shape
        hq, d = q.shape[1], q.shape[2]
        hkv = k_cache.shape[1]
        g = hq // hkv
        keys = torch.cat([k_cache, k[group.rows].transpose(1, 2).to(k_cache.dtype)], 2)  # [G, Hkv, t + n, D]
        vals = torch.cat([v_cache, v[group.rows].transpose(1, 2).to(v_cache.dtype)], 2)
        kpos, valid = win.kpos[:, layer], win.valid[:, layer]  # [G, Hkv, t + n]
        mask = valid[:, :, None, :] & self._window_mask(group.q_pos[:, None, :, None], kpos[:, :, None, :],
                                                        self.rings[layer])  # [G, Hkv, n, t + n]
        tk = keys.shape[2]
        qh = q[group.rows].view(G, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(G, hkv, g * n, d).to(keys.dtype)
        mask = mask[:, :, None].expand(G, hkv, g, n, tk).reshape(G, hkv, g * n, tk)
        out = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=mask, scale=self.scale)  # [G, Hkv, g*n, D]
        out = out.view(G, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(G, n, hq, d).to(q.dtype)
        out = out.reshape(G * n, hq, d) if group.valid is None else out[group.valid]
        view = BatchView(group.table[:, layer, :, : win.t_cache], win.lens[:, layer])
        self.observe_layer(plan, layer, group, q, view, (keys, kpos, valid))
        return out

    def _window_mask(self, qp: torch.Tensor, kp: torch.Tensor, ring: int) -> torch.Tensor:
        """Query at p sees keys {pos < sink} U (p - ring, p] (and the model's sliding window)."""
        mask = (kp <= qp) & ((kp < self.config.sink_size) | (kp > qp - ring))
        if self.sliding_window is not None:
            mask &= kp > qp - self.sliding_window
        return mask

    # ------------------------------------------------------------------ per-sequence hooks (legacy path)
    def write(self, seq, layer, k, v, positions, k_pre=None) -> None:
        if int(self._held(seq)[layer]) + k.shape[0] <= self.budgets[layer] or k.shape[0] == 1:
            # Everything stays visible (fits), or one decode token: the slot it overwrites holds
            # position p - ring, which the new query may not see anyway -> store before attention.
            self._store(seq, layer, k, v, positions)
        else:
            state = seq.kv.state
            state.pending = {} if state.pending is None else state.pending
            state.pending[layer] = (k, v, positions)

    def attend(self, seq, layer, q, q_pos):
        pending = seq.kv.state.pending.pop(layer, None) if seq.kv.state.pending else None
        if pending is None:
            return super().attend(seq, layer, q, q_pos)
        k_new, v_new, pos_new = pending
        slots, valid = seq.kv.tables[layer].padded()
        k, v, kpos = gather_kv(self.pool, slots)  # [H, T, D], all heads hold the same positions
        k = torch.cat([k, k_new.transpose(0, 1).to(k.dtype)], dim=1)
        v = torch.cat([v, v_new.transpose(0, 1).to(v.dtype)], dim=1)
        kpos = torch.cat([kpos[0], pos_new.to(kpos.device)])
        out = self._attend_window(q, q_pos, k, v, kpos, layer)
        self._store(seq, layer, k_new, v_new, pos_new)  # fold the chunk into the ring
        return out

    def _attend_window(self, q, q_pos, k, v, kpos, layer):
        """Causal attention of one sequence where query p sees keys {pos < sink} U (p - ring, p]."""
        mask = self._window_mask(q_pos.to(kpos.device)[:, None], kpos[None, :], self.rings[layer])
        g = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).to(k.dtype), k, v, attn_mask=mask[None], scale=self.scale)
        return out.transpose(0, 1).to(q.dtype)

    def _store(self, seq, layer: int, k, v, positions) -> None:
        """Write n tokens as if one at a time: fill free capacity, then overwrite the ring in place."""
        table, budget, state = seq.kv.tables[layer], self.budgets[layer], seq.kv.state
        n, hkv, d = k.shape
        sink, ring = self.config.sink_size, self.rings[layer]
        a = min(n, max(0, budget - int(table.lens[0])))
        if a:
            slots = self.pool.allocate(a * hkv).view(hkv, a)
            self.pool.write(slots.reshape(-1), k[:a].transpose(0, 1).reshape(-1, d),
                            v[:a].transpose(0, 1).reshape(-1, d), positions[:a].repeat(hkv))
            table.append(slots)
        r = n - a
        if r == 0:
            return
        # Only the last m of the r overflow tokens survive; token j of them lands at ring offset
        # (ptr + r - m + j) % ring, exactly where sequential one-token overwrites would put it.
        ptr = int(state.ptr[layer])
        m = min(r, ring)
        cols = (sink + (ptr + r - m + torch.arange(m)) % ring).to(table.slots.device)
        targets = table.slots[:, cols]  # [H, m]
        shared = self.pool.refcount[targets.reshape(-1)] > 1
        if bool(shared.any()):  # copy-on-write: never overwrite a slot another owner still reads
            fresh = self.pool.allocate(int(shared.sum()))
            self.pool.free(targets.reshape(-1)[shared])
            targets = targets.reshape(-1).clone()
            targets[shared] = fresh
            targets = targets.view(hkv, m)
            table.slots[:, cols] = targets
        self.pool.write(targets.reshape(-1), k[n - m :].transpose(0, 1).reshape(-1, d),
                        v[n - m :].transpose(0, 1).reshape(-1, d), positions[n - m :].repeat(hkv))
        state.ptr[layer] = (ptr + r) % ring
        if state.cow is not None:  # once every ring slot was rewritten since the fork, none is shared
            state.cow[layer] = max(0, int(state.cow[layer]) - r)
            if not bool(state.cow.any()):
                state.cow = None
