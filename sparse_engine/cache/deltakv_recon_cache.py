"""DeltaKV's reconstructed-token cache across decode steps (`DeltaKVConfig.reuse_reconstructed`).

Why: at decode every sparse layer rebuilds the `num_top_tokens` selected compressed tokens
(up-projection, father mean, RoPE) each step, although consecutive steps select nearly the same
tokens. A reconstructed token never changes (its latent and its fathers, exact prototypes, are
fixed), so keeping it is exact: the cache only trades pool slots for compute.

Layout per sequence (`ReconState`): `slots [Ls, Hkv, C]` pool slots of every sparse layer, and per
observation layer `pos [n_obs, C]` the position each column holds (-1 = empty) and `stamp [n_obs, C]`
the last step that read it. C = `reconstructed_cache_factor` x the selection width: the selection
churns at its margin (tokens near the top-k threshold drop out and come back), so room for more than
one selection keeps them. Every sparse layer
served by one observer reads the same selection, so the column assignment is made once per
observer and step and each of its layers only reconstructs the misses into its own slots.

A step (one row group of decoding sequences):
1. `ensure_capacity` (host, `begin_step`): C >= factor x the step's selection width, new columns
   allocated from the pool. The caches are EVICTABLE: they grow only from slots no step's reservation
   needs (`slots_needed` does not count them) and the scheduler reclaims them (`reclaim`, whole
   caches, largest first) before a sequence waits or is preempted; a group whose rows cannot all read
   through a cache takes the plain per-layer scratch path for the step. Counted in `kv_bytes`;
2. `assign` (observation layer): selected tokens already cached keep their column; each miss takes a
   column not read this step, least recently read first (LRU);
3. the sparse layers reconstruct the misses only and read the selected columns.
Only decode groups use it: a prefill chunk reconstructs every compressed token, which would grow
the cache to the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReconState:
    """One sequence's cache: slots [Ls, Hkv, C], pos / stamp [n_obs, C] (device; -1 = empty)."""

    slots: torch.Tensor
    pos: torch.Tensor
    stamp: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.slots.shape[-1]

    @property
    def num_slots(self) -> int:
        return self.slots.numel()


def empty_state(num_sparse: int, num_kv_heads: int, num_observers: int, device) -> ReconState:
    return ReconState(torch.zeros(num_sparse, num_kv_heads, 0, dtype=torch.long, device=device),
                      torch.zeros(num_observers, 0, dtype=torch.long, device=device),
                      torch.zeros(num_observers, 0, dtype=torch.long, device=device))


def ensure_capacity(st: ReconState, width: int, pool) -> ReconState:
    """Grow `st` to at least `width` columns with new pool slots (empty columns: pos -1)."""
    grow = width - st.capacity
    if grow <= 0:
        return st
    ls, hkv, _ = st.slots.shape
    new = pool.allocate(ls * hkv * grow).view(ls, hkv, grow)
    pad = st.pos.new_full((st.pos.shape[0], grow), -1)
    return ReconState(torch.cat([st.slots, new], dim=2), torch.cat([st.pos, pad], dim=1),
                      torch.cat([st.stamp, pad], dim=1))


def release(st: ReconState | None, pool) -> None:
    if st is not None and st.capacity:
        pool.free(st.slots.reshape(-1))


@dataclass
class GroupCache:
    """The row group's caches stacked for the step: slots [G, Ls, Hkv, C] (pad: trash), pos / stamp
    [G, n_obs, C] (pad: -1), caps: each row's real capacity."""

    slots: torch.Tensor
    pos: torch.Tensor
    stamp: torch.Tensor
    caps: list[int]
    persistent: list[bool]  # False: a row with nothing to reconstruct (an empty cache), nothing written back


def stack(states: list[ReconState], trash: int, persistent: list[bool]) -> GroupCache:
    c = max(st.capacity for st in states)
    slots = torch.stack([torch.nn.functional.pad(st.slots, (0, c - st.capacity), value=trash) for st in states])
    pos = torch.stack([torch.nn.functional.pad(st.pos, (0, c - st.capacity), value=-1) for st in states])
    stamp = torch.stack([torch.nn.functional.pad(st.stamp, (0, c - st.capacity), value=-1) for st in states])
    return GroupCache(slots, pos, stamp, [st.capacity for st in states], persistent)


@dataclass
class Assignment:
    """One observer's step: the misses to reconstruct (li [G, m] indices into the latent arrays,
    pos [G, m], valid [G, m], col [G, m] cache columns) and the columns read this step (used [G, C])."""

    li: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    col: torch.Tensor
    used: torch.Tensor
    num_hits: torch.Tensor


def assign(cpos: torch.Tensor, stamp: torch.Tensor, now: int, caps: list[int], li: torch.Tensor,
           lvalid: torch.Tensor, rpos: torch.Tensor, p_max: int) -> Assignment:
    """Map this step's selected latent tokens (li / lvalid / rpos [G, w]) onto the cache columns
    whose positions are `cpos` [G, C] and last reads `stamp` [G, C] (both updated in place: the
    misses' positions, `now` for every column read); every position is < `p_max`."""
    G, C = cpos.shape
    dev = cpos.device
    # position -> cached column (+1 so that -1 lands in a dummy column 0)
    where = torch.full((G, p_max + 1), -1, dtype=torch.long, device=dev)
    where.scatter_(1, cpos + 1, torch.arange(C, device=dev).expand(G, C).contiguous())
    where[:, 0] = -1
    sel = torch.where(lvalid, rpos + 1, torch.zeros_like(rpos))
    hit_col = where.gather(1, sel)  # [G, w]: -1 = miss (or not selected)
    hit = hit_col >= 0
    miss = lvalid & ~hit
    used = torch.zeros(G, C + 1, dtype=torch.int32, device=dev)
    used.scatter_add_(1, torch.where(hit, hit_col, C), hit.to(torch.int32))
    used = used[:, :C] > 0
    # columns free for misses: not read this step and inside the row's capacity, least recently read first
    real = torch.arange(C, device=dev)[None, :] < torch.tensor(caps, device=dev)[:, None]
    free = ~used & real
    age = torch.where(free, stamp, torch.iinfo(torch.long).max)
    free_cols = torch.sort(age, dim=1, stable=True).indices  # free first, oldest first
    rank = (torch.cumsum(miss.to(torch.long), dim=1) - 1).clamp(min=0)
    new_col = free_cols.gather(1, rank.clamp(max=C - 1))
    m = int(miss.sum(1).max()) if miss.numel() else 0
    order = torch.sort((~miss).to(torch.int8), dim=1, stable=True).indices[:, :m]  # misses first, in order
    mvalid = miss.gather(1, order)
    mcol = new_col.gather(1, order)
    mpos = rpos.gather(1, order)
    # record the misses' positions in their columns (padding writes go to the dummy column C)
    ext = torch.cat([cpos, cpos.new_full((G, 1), -1)], dim=1)
    ext.scatter_(1, torch.where(mvalid, mcol, C), torch.where(mvalid, mpos, -1))
    cpos.copy_(ext[:, :C])
    used_all = torch.zeros(G, C + 1, dtype=torch.bool, device=dev)
    used_all[:, :C] = used
    used_all.scatter_(1, torch.where(mvalid, mcol, C), mvalid)
    stamp.masked_fill_(used_all[:, :C], now)
    return Assignment(li.gather(1, order), mpos, mvalid, mcol, used_all[:, :C], hit.sum())
