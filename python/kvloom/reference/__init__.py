"""Plain-PyTorch reference implementations: the oracle for every kernel and policy.

Readable first, fast never. Attention is computed in float64 from the inputs' values.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "decode_attention", "rotate", "segment_attention", "window_keep", "CacheModel",
    "accumulated_attention", "heavy_hitter_keep", "fastgen_levels", "fastgen_recovery", "fastgen_keep",
    "taskkv_column_means", "taskkv_profile",
    "quant_block_bytes", "quant_value_group", "quant_refits", "quant_keeps", "quantize_block", "dequantize_block",
    "give_way_key", "budget_bytes", "budget_victims",
]

SPECIAL, PUNCT = 1, 2  # token-class bits


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, T, D] -> [B, Hq, D] (float64). Query head i reads kv head
    i // (Hq // Hkv)."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    assert Hq % Hkv == 0
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.double().reshape(B, Hkv, group, D)  # query head h*group + g reads kv head h
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k.double()) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhgt,bhtd->bhgd", probs, v.double()).reshape(B, Hq, D)


def rotate(x: torch.Tensor, delta, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotates the last dimension of x by RoPE angle offsets delta * inv_freq
    (rotate-half convention, first 2 * len(inv_freq) features). ``delta`` broadcasts
    against x's leading dimensions."""
    x = x.double()
    nf = inv_freq.numel()
    delta = torch.as_tensor(delta, dtype=torch.float64)
    ang = delta[..., None] * inv_freq.double()  # [..., nf]
    while ang.dim() < x.dim():
        ang = ang.unsqueeze(-2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2, rest = x[..., :nf], x[..., nf:2 * nf], x[..., 2 * nf:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def segment_attention(q: torch.Tensor, segments: Sequence[Tuple[torch.Tensor, torch.Tensor, Optional[Sequence[int]]]],
                      inv_freq: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Attention over explicitly concatenated segments whose keys are re-rotated to the
    view's positions: a key of segment s moves by -delta_s (equivalent to rotating the
    query by +delta_s)."""
    B = q.shape[0]
    ks, vs = [], []
    for k, v, delta in segments:
        k = k.double()
        if delta is not None and inv_freq is not None:
            d = torch.as_tensor(list(delta), dtype=torch.float64).view(B, 1, 1)
            k = rotate(k, -d, inv_freq)
        ks.append(k)
        vs.append(v.double())
    return decode_attention(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), scale)


def window_keep(ords: Sequence[int], appended: int, sinks: int, recent: int) -> List[int]:
    """StreamingLLM: the ords a Window(sinks, recent) head keeps after `appended` tokens."""
    return [o for o in ords if o < sinks or o >= appended - recent]


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, key_ords: Sequence[int], n_seen: int,
                          scale: Optional[float] = None) -> torch.Tensor:
    """H2O's statistic for one kv head: q [G, Tq, D] (the head's query group; query i is
    token n_seen - Tq + i), k [L, D] live keys with their ords. Returns [L]: the attention
    each key receives, summed over the group and the queries, causal."""
    G, Tq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ords = torch.as_tensor(list(key_ords))
    q_ords = torch.arange(n_seen - Tq, n_seen)
    scores = torch.einsum("gtd,ld->gtl", q.double(), k.double()) * scale
    scores = scores.masked_fill(ords[None, None, :] > q_ords[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs.sum(dim=(0, 1))


def heavy_hitter_keep(ords: Sequence[int], scores: Sequence[float], appended: int, ratio: float,
                      recent: int) -> List[int]:
    """H2O: the ords kept after `appended` tokens: the `recent` newest plus the
    ceil(ratio * appended) older ones with the largest score (ties: older first)."""
    first_recent = appended - recent
    old = [(o, s) for o, s in zip(ords, scores) if o < first_recent]
    keep = math.ceil(ratio * appended)
    old.sort(key=lambda x: (-x[1], x[0]))
    return sorted([o for o, _ in old[:keep]] + [o for o in ords if o >= first_recent])


def _top(ords, scores, ratio, n_base):
    """The ceil(ratio * n_base) ords with the highest score (ties: older first)."""
    k = min(len(ords), math.ceil(ratio * n_base))
    ranked = sorted(zip(ords, scores), key=lambda x: (-x[1], x[0]))
    return {o for o, _ in ranked[:k]}


def fastgen_levels(ords, classes, scores, r_frequent, n_base):
    """Smallest FastGen hybrid (0 special, 1 +punct, 2 +frequent, 4 none) holding each key,
    before the query-dependent local window."""
    freq = _top(ords, scores, r_frequent, n_base)
    return [0 if c & SPECIAL else 1 if c & PUNCT else 2 if o in freq else 4 for o, c in zip(ords, classes)]


def fastgen_recovery(q, k, ords, classes, scores, n_seen, r_frequent, local_window, scale=None):
    """Mean over queries (q [G, Tq, D], causal) of the attention mass each nested hybrid
    keeps: [special, +punct, +frequent, +local]."""
    G, Tq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ords_t = torch.as_tensor(list(ords))
    levels = torch.as_tensor(fastgen_levels(list(ords), list(classes), list(scores), r_frequent, len(ords)))
    q_ords = torch.arange(n_seen - Tq, n_seen)
    s = torch.einsum("gtd,ld->gtl", q.double(), k.double()) * scale
    visible = ords_t[None, :] <= q_ords[:, None]  # [Tq, L]
    s = s.masked_fill(~visible[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    local = (q_ords[:, None] - ords_t[None, :]) < local_window
    lv = torch.where(local & (levels[None, :] > 3), torch.full_like(levels[None, :], 3), levels[None, :])  # [Tq, L]
    rows = visible.any(dim=1)
    out = []
    for j in range(4):
        mass = (p * (lv <= j)[None]).sum(-1)  # [G, Tq]
        out.append(mass[:, rows].mean().item())
    return out


def fastgen_keep(level, ords, classes, scores, appended, local_window, r_frequent):
    """The ords a FastGen head at hybrid `level` keeps after `appended` tokens."""
    if level == 4:
        return sorted(ords)
    freq = _top(ords, scores, r_frequent, appended) if level >= 2 else set()
    keep = []
    for o, c in zip(ords, classes):
        if (c & SPECIAL) or (level >= 1 and c & PUNCT) or (level >= 2 and o in freq) or \
                (level >= 3 and appended - 1 - o < local_window):
            keep.append(o)
    return sorted(keep)


def taskkv_column_means(q_obs, keys, n_seen, scale=None):
    """Task-KV's statistic: per kv head, the observation window's column-mean attention [T]
    (q_obs[h]: the group's last queries [G, L, D], causal; keys[h]: the prompt's keys [T, D])."""
    out = []
    for q, k in zip(q_obs, keys):
        G, L, D = q.shape
        T = k.shape[0]
        sc = (1.0 / math.sqrt(D)) if scale is None else scale
        s = torch.einsum("gld,td->glt", q.double(), k.double()) * sc
        q_ords = torch.arange(n_seen - L, n_seen)
        s = s.masked_fill(torch.arange(T)[None, None, :] > q_ords[None, :, None], float("-inf"))
        out.append(torch.softmax(s, dim=-1).mean(dim=(0, 1)))
    return out


def taskkv_profile(q_obs, keys, values, n_seen, cfg, layer, n_layers, scale=None):
    """Task-KV decisions for one layer and sequence from raw queries/keys/values:
    (heterogeneous heads, {head: sorted middle ords kept})."""
    return cfg.decide(taskkv_column_means(q_obs, keys, n_seen, scale), values, layer, n_layers)


@dataclass
class _Token:
    ord: int
    pos: int
    k: torch.Tensor  # [D]
    v: torch.Tensor  # [D]


@dataclass
class _Head:
    tokens: Dict[int, _Token] = field(default_factory=dict)  # ord -> token
    appended: int = 0


class CacheModel:
    """What a KVCache holds, as plain Python: per (layer, head, seq) the live tokens by ord.

    Mirrors KVCache's sequence operations (add, fork, drop, rollback, append, evict,
    window policy) without any blocks, so tests can compare contents and lengths.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, dtype=torch.float32):
        self.n_layers, self.n_kv_heads, self.dtype = n_layers, n_kv_heads, dtype
        self.seqs: Dict[int, List[_Head]] = {}
        self.next_id = 0

    def _heads(self, seq: int) -> List[_Head]:
        if seq not in self.seqs:
            raise IndexError(f"sequence {seq} does not exist")
        return self.seqs[seq]

    def head(self, layer: int, h: int, seq: int) -> _Head:
        return self._heads(seq)[layer * self.n_kv_heads + h]

    def add(self) -> int:
        sid = self.next_id
        self.next_id += 1
        self.seqs[sid] = [_Head() for _ in range(self.n_layers * self.n_kv_heads)]
        return sid

    def fork(self, seq: int) -> int:
        heads = copy.deepcopy(self._heads(seq))
        sid = self.next_id
        self.next_id += 1
        self.seqs[sid] = heads
        return sid

    def drop(self, seq: int) -> None:
        self._heads(seq)
        del self.seqs[seq]

    def rollback(self, seq: int, n: int) -> None:
        heads = self._heads(seq)
        if n < 0 or any(n > h.appended for h in heads):
            raise ValueError("rollback past the start")
        for h in heads:
            keep = h.appended - n
            h.tokens = {o: t for o, t in h.tokens.items() if o < keep}
            h.appended = keep

    def append(self, layer: int, seq: int, k: torch.Tensor, v: torch.Tensor, positions=None) -> None:
        """k, v [n_kv_heads, n, D]; values are stored as the cache stores them (its dtype)."""
        n = k.shape[1]
        for h in range(self.n_kv_heads):
            hd = self.head(layer, h, seq)
            for j in range(n):
                o = hd.appended + j
                p = o if positions is None else int(positions[j])
                hd.tokens[o] = _Token(o, p, k[h, j].to(self.dtype).clone(), v[h, j].to(self.dtype).clone())
            hd.appended += n

    def evict_ords(self, layer: int, h: int, seq: int, ords: Sequence[int]) -> None:
        hd = self.head(layer, h, seq)
        for o in ords:
            del hd.tokens[o]

    def apply_window(self, layer: int, seq: int, sinks: int, recent: int) -> None:
        for h in range(self.n_kv_heads):
            hd = self.head(layer, h, seq)
            keep = set(window_keep(sorted(hd.tokens), hd.appended, sinks, recent))
            hd.tokens = {o: t for o, t in hd.tokens.items() if o in keep}

    def length(self, layer: int, h: int, seq: int) -> int:
        return len(self.head(layer, h, seq).tokens)

    def contents(self, layer: int, h: int, seq: int):
        """(k [L, D], v [L, D], ords, positions) in ord order."""
        hd = self.head(layer, h, seq)
        toks = [hd.tokens[o] for o in sorted(hd.tokens)]
        if not toks:
            return None, None, [], []
        return (torch.stack([t.k for t in toks]), torch.stack([t.v for t in toks]),
                [t.ord for t in toks], [t.pos for t in toks])


def pool_kv_heads(weight: torch.Tensor, old_heads: int, new_heads: int, head_dim: int, init: str) -> torch.Tensor:
    """GQA conversion of one K/V projection (weight [old_heads * head_dim, in] or bias):
    new head g is the mean ('mean') or the first ('first') of old heads
    g * r .. g * r + r - 1, r = old_heads / new_heads. Plain loops."""
    r = old_heads // new_heads
    rows = []
    for g in range(new_heads):
        members = [weight[(g * r + j) * head_dim:(g * r + j + 1) * head_dim].double() for j in range(r)]
        if init == "mean":
            acc = members[0].clone()
            for m in members[1:]:
                acc = acc + m
            rows.append(acc / r)
        else:
            rows.append(members[0])
    return torch.cat(rows, 0)


def kv_head_of_query(q_head: int, n_q_heads: int, n_kv_heads: int) -> int:
    """The kv head a query head reads under GQA (transformers' layout)."""
    return q_head // (n_q_heads // n_kv_heads)


# --- NAtS (Neural Attention Search) token types ----------------------------------------------
NATS_GLOBAL, NATS_LOCAL, NATS_SLIDING = 0, 1, 2


def nats_visible(types: Sequence[int], window: int) -> torch.Tensor:
    """bool [T, T]: query i may attend key j (one kv head, token types 0 global, 1 local,
    2 sliding). j <= i always; a global key is seen by every later query; a local key j by
    the queries up to and including the next global token after j (it is dropped once that
    token has been attended); a sliding key j by the queries i with i - j < window. Plain loops."""
    T = len(types)
    vis = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(i + 1):
            t = types[j]
            if j == i or t == NATS_GLOBAL:
                vis[i, j] = True
            elif t == NATS_LOCAL:
                vis[i, j] = not any(types[k] == NATS_GLOBAL for k in range(j + 1, i))
            else:
                vis[i, j] = i - j < window
    return vis


def nats_keep(types: Sequence[int], appended: int, window: int) -> List[int]:
    """The ords a NAtS head keeps after `appended` tokens: those the next query may see."""
    keep = []
    for j in range(appended):
        t = types[j]
        if t == NATS_GLOBAL:
            keep.append(j)
        elif t == NATS_LOCAL:
            if not any(types[k] == NATS_GLOBAL for k in range(j + 1, appended)):
                keep.append(j)
        elif appended - j < window:
            keep.append(j)
    return keep


# --- quantized KV blocks (the format of kvloom/quant.h, defined here in PyTorch) -------------
def quant_block_bytes(bits: int, block_size: int, head_dim: int) -> int:
    """Bytes of one quantized block: key codes, key (min, step) per channel, value codes,
    value (min, step) per channel group and token (group-major), padded to 16."""
    codes = block_size * head_dim * bits // 8
    groups = head_dim // quant_value_group(head_dim, bits)
    raw = codes + 4 * head_dim + codes + 4 * block_size * groups
    return -(-raw // 16) * 16


def quant_value_group(head_dim: int, bits: int) -> int:
    """Channels sharing one value (min, step): 32 (16 at 2 bits) when head_dim is a multiple of
    it, else all."""
    group = 16 if bits == 2 else 32
    return group if head_dim % group == 0 else head_dim


def quant_refits(bits: int) -> int:
    """Least-squares range refits per group (2 bits: 3; see ``quantize_block``)."""
    return 3 if bits == 2 else 0


def quant_keeps(bits: int) -> Tuple[bool, bool]:
    """(first block, newest full block) a quantized cache keeps in full precision: at 2 bits
    each head's first block (table entry 0, the attention sinks) and the full block holding its
    newest token (a residual of recent tokens beside the block being filled); none otherwise."""
    return (bits == 2, bits == 2)


def _f16_toward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The fp16 nearest to x (float32) on the given side: the smallest >= x (up) or largest <= x."""
    h = x.to(torch.float16)
    bad = h.float() < x if up else h.float() > x
    target = torch.full_like(h, float("inf") if up else -float("inf"))
    return torch.where(bad, torch.nextafter(h, target), h)


def _range_params(lo: torch.Tensor, hi: torch.Tensor, levels: float):
    """(min fp16, step fp16, ok) of ranges (lo, hi) (float32): ok where the range and step stay
    within fp16's."""
    ok = (lo >= -65504.0) & (hi <= 65504.0) & (lo <= hi)
    lo_c = torch.where(ok, lo, torch.zeros_like(lo))
    hi_c = torch.where(ok, hi, torch.zeros_like(hi))
    mn16 = _f16_toward(lo_c, up=False)
    mn = mn16.float()
    st16 = torch.where(hi_c > mn, _f16_toward((hi_c - mn) / levels, up=True), torch.zeros_like(mn16))
    return mn16, st16, ok & torch.isfinite(st16)


def _group_codes(x: torch.Tensor, counted: torch.Tensor, levels: float, mn16, st16):
    """(codes float32, squared error float64 summed in element order) of groups under (mn16, st16)."""
    mn, st = mn16.float()[..., None], st16.float()[..., None]
    safe = torch.where(st == 0, torch.ones_like(st), st)
    c = torch.floor((x - mn) / safe + 0.5).clamp(0, levels)
    c = torch.where(counted & (st != 0), c, torch.zeros_like(c))
    value = (c.double() * st.double() + mn.double()).float()  # one rounding, as a fused multiply-add
    e = x.double() - value.double()
    sq = torch.where(counted, e * e, torch.zeros_like(e))
    err = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for j in range(x.shape[-1]):  # element order, as the C++ loop adds
        err = err + sq[..., j]
    return c, err


def _quant_group(x: torch.Tensor, counted: torch.Tensor, bits: int):
    """(codes int64, min fp16, step fp16) of groups along the last dimension of x (float32);
    entries where counted is False get code 0 and do not widen the range. The range is the
    counted entries' (min, max), then refit ``quant_refits(bits)`` times by least squares on the
    codes while that lowers the group's squared error (kvloom/quant.h)."""
    levels = float((1 << bits) - 1)
    inf = torch.tensor(float("inf"))
    lo = torch.where(counted, x, inf).amin(-1)
    hi = torch.where(counted, x, -inf).amax(-1)
    empty = ~counted.any(-1)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    mn16, st16, _ = _range_params(lo, hi, levels)
    c, err = _group_codes(x, counted, levels, mn16, st16)
    active = ~empty
    n = counted.sum(-1).double()
    for _ in range(quant_refits(bits)):
        s1 = torch.zeros_like(err)
        s2, sx, sxc = s1.clone(), s1.clone(), s1.clone()
        for j in range(x.shape[-1]):  # sums in double, element order
            cj = torch.where(counted[..., j], c[..., j].double(), torch.zeros_like(s1))
            xj = torch.where(counted[..., j], x[..., j].double(), torch.zeros_like(s1))
            s1, s2, sx, sxc = s1 + cj, s2 + cj * cj, sx + xj, sxc + xj * cj
        det = n * s2 - s1 * s1
        active = active & (det > 0)
        b = (n * sxc - s1 * sx) / torch.where(active, det, torch.ones_like(det))
        active = active & (b > 0)
        a = (sx - b * s1) / torch.where(n > 0, n, torch.ones_like(n))
        lo2, hi2 = a.float(), (a + b * levels).float()
        m2, t2, ok = _range_params(lo2, hi2, levels)
        active = active & ok
        c2, e2 = _group_codes(x, counted, levels, m2, t2)
        active = active & (e2 < err)
        mn16 = torch.where(active, m2, mn16)
        st16 = torch.where(active, t2, st16)
        c = torch.where(active[..., None], c2, c)
        err = torch.where(active, e2, err)
    return c.long(), mn16, st16  # (_group_codes gave uncounted entries and zero steps code 0)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, D] codes -> [rows, D * bits / 8] bytes, element i at bit i * bits (low bits first)."""
    per = 8 // bits
    c = codes.reshape(codes.shape[0], -1, per)
    shifts = torch.arange(per) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per) * bits
    return ((packed.long()[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], D)


def quantize_block(k: torch.Tensor, v: torch.Tensor, bits: int, block_size: int, live=None) -> torch.Tensor:
    """One quantized block (uint8 [quant_block_bytes]) of n <= block_size rows k, v [n, D]
    (finite, |x| <= 65504): keys per channel over the counted rows (``live``, default all),
    values per token per channel group (``quant_value_group``); minimum rounded down and step
    rounded up to fp16, code = min(2^bits - 1, floor((x - min) / step + 0.5)), 2-bit ranges refit
    by least squares (``_quant_group``); rows not counted get code 0."""
    k, v = k.float(), v.float()
    n, D = k.shape
    live = torch.ones(n, dtype=torch.bool) if live is None else torch.as_tensor(live, dtype=torch.bool)
    gv = quant_value_group(D, bits)
    kc, kmin, kstep = _quant_group(k.t(), live[None, :].expand(D, n), bits)  # [D, n]
    vc, vmin, vstep = _quant_group(v.reshape(n, D // gv, gv), torch.ones(n, D // gv, gv, dtype=torch.bool), bits)
    vc = torch.where(live[:, None, None], vc, torch.zeros_like(vc)).reshape(n, D)
    vmin = torch.where(live[:, None], vmin, torch.zeros_like(vmin))
    vstep = torch.where(live[:, None], vstep, torch.zeros_like(vstep))
    kcodes = torch.zeros(block_size, D, dtype=torch.long)
    vcodes = torch.zeros(block_size, D, dtype=torch.long)
    kcodes[:n], vcodes[:n] = kc.t(), vc
    vparams = torch.zeros(2, D // gv, block_size, dtype=torch.float16)  # [min|step][group][token]
    vparams[0, :, :n], vparams[1, :, :n] = vmin.t(), vstep.t()
    parts = [_pack(kcodes, bits).reshape(-1), torch.stack([kmin, kstep]).reshape(-1).view(torch.uint8),
             _pack(vcodes, bits).reshape(-1), vparams.reshape(-1).view(torch.uint8)]
    out = torch.zeros(quant_block_bytes(bits, block_size, D), dtype=torch.uint8)
    raw = torch.cat(parts)
    out[:raw.numel()] = raw
    return out


def dequantize_block(block: torch.Tensor, bits: int, block_size: int, head_dim: int, n: int):
    """(k, v) float32 [n, head_dim] of rows [0, n) of a block: min + code * step, the product and
    sum rounded once (a fused multiply-add, as the kernels do)."""
    D, gv = head_dim, quant_value_group(head_dim, bits)
    rb = D * bits // 8
    codes = block_size * rb
    b = block.to(torch.uint8)
    kc = _unpack(b[:codes].reshape(block_size, rb), bits, D)[:n]
    kp = b[codes:codes + 4 * D].view(torch.float16).reshape(2, D).double()
    vo = codes + 4 * D
    vc = _unpack(b[vo:vo + codes].reshape(block_size, rb), bits, D)[:n]
    vp = b[vo + codes:vo + codes + 4 * block_size * (D // gv)].view(torch.float16).reshape(2, D // gv, block_size)
    vp = vp[:, :, :n].transpose(1, 2).double().repeat_interleave(gv, -1)
    k = (kc.double() * kp[1] + kp[0]).float()
    v = (vc.double() * vp[1] + vp[0]).float()
    return k, v


# --- the memory budget (kv_budget) ---------------------------------------------------------
NEVER_GIVES_WAY = 2**31 - 1


def give_way_key(plan: str, params: dict, *, ord: int, appended: int, score: float, cls: int) -> Tuple[int, float]:
    """The budget rule's key (tier, value) of one live token of a head whose plan is `plan`
    (the C++ plan name: "full", "window", "heavy_hitter", "fastgen", "keep_set", "nats") with
    `params`; lower keys give way first (then the older token). A head's newest token never
    gives way. The rules:

    - full: tokens after the first 4 (sinks), oldest first; then the sinks.
    - window: the same with the plan's sinks.
    - heavy_hitter: tokens outside the recent window by accumulated attention, the least
      first; then the recent window, oldest first.
    - fastgen: tokens neither special nor punctuation by attention received per query since
      they arrived (score / (appended - ord)), the least first; then punctuation; then special.
    - keep_set (Task-KV): the heads that keep a subset (oldest first, sinks last) before the
      keep-all (heterogeneous) heads (oldest first).
    - nats: sliding tokens, then local, then global, each oldest first.
    """
    if ord == appended - 1:
        return NEVER_GIVES_WAY, 0.0
    if plan == "full":
        return (1 if ord < 4 else 0), float(ord)
    if plan == "window":
        return (1 if ord < params.get("sinks", 4) else 0), float(ord)
    if plan == "heavy_hitter":
        if ord >= appended - params.get("recent", 64):
            return 1, float(ord)
        return 0, float(score)
    if plan == "fastgen":
        tier = 2 if cls & SPECIAL else 1 if cls & PUNCT else 0
        return tier, float(score) / float(appended - ord)
    if plan == "keep_set":
        tier = 1 if params.get("keep_all", 0) else (2 if ord < params.get("sinks", 0) else 0)
        return tier, float(ord)
    if plan == "nats":
        return {2: 0, 1: 1}.get(cls, 2), float(ord)
    raise ValueError(f"no budget rule for plan {plan!r}")


def budget_bytes(fraction: float, full_tokens: int, n_kv_heads: int, block_size: int, block_bytes: int,
                 sealed_block_bytes: int = 0) -> int:
    """The bytes one layer of one sequence may hold: ``fraction`` of what Full holds for
    ``full_tokens`` tokens per head (``ceil(full_tokens / block_size)`` float blocks per head),
    never less than one float block per head (plus one sealed block per head in a quantized
    cache)."""
    want = math.floor(fraction * float(n_kv_heads * -(-full_tokens // block_size) * block_bytes))
    return max(n_kv_heads * (block_bytes + sealed_block_bytes), want)


def budget_victims(heads: Sequence[dict], limit: int, block_size: int, block_bytes: int,
                   sealed_block_bytes: Optional[int] = None, quant_bits: int = 0) -> List[List[int]]:
    """One round of the budget's selection over one layer of one sequence. ``heads``: per kv
    head a dict with ``slots`` (live slots), ``ords``, ``keys`` ((tier, value) per live slot) and
    ``sealed`` (the set of sealed table entries). Units give way in key order (tier, value, ord,
    head, slot): a float token alone, a sealed block whole (its key is its live tokens' largest).
    Units are taken (at least one) until the projected bytes fit `limit`: sealed blocks at
    ``sealed_block_bytes`` each plus each head's float tokens packed into blocks (and, in a
    quantized cache of ``quant_bits``, full ones sealed but those ``quant_keeps`` names).
    Returns the slots each head frees, in take order."""
    keep_first, keep_newest = quant_keeps(quant_bits)

    def float_bytes(n):
        if sealed_block_bytes is None:
            return -(-n // block_size) * block_bytes
        out = 0
        if keep_first and n > 0:
            out, n = block_bytes, max(0, n - block_size)
        full = n // block_size
        if keep_newest and full > 0:
            out, full = out + block_bytes, full - 1
        return out + full * sealed_block_bytes + (block_bytes if n % block_size else 0)

    units, fp_live, n_sealed = [], [], []
    for h, hd in enumerate(heads):
        blocks: Dict[int, list] = {}
        n_fp = 0
        for slot, o, key in zip(hd["slots"], hd["ords"], hd["keys"]):
            entry = slot // block_size
            if entry in hd["sealed"]:
                blocks.setdefault(entry, []).append(((key[0], key[1], o, h, entry), slot))
                continue
            n_fp += 1
            if key[0] != NEVER_GIVES_WAY:
                units.append(((key[0], key[1], o, h, slot), [slot], h, False))
        for entry, members in blocks.items():
            top = max(m[0] for m in members)
            if top[0] != NEVER_GIVES_WAY:
                units.append((top, [m[1] for m in members], h, True))
        fp_live.append(n_fp)
        n_sealed.append(len(blocks))
    units.sort(key=lambda u: u[0])
    projected = sum(n * (sealed_block_bytes or 0) + float_bytes(f) for n, f in zip(n_sealed, fp_live))
    out: List[List[int]] = [[] for _ in heads]
    taken = 0
    for _, slots, h, is_block in units:
        if taken and projected <= limit:
            break
        out[h].extend(slots)
        if is_block:
            projected -= sealed_block_bytes
        else:
            projected += float_bytes(fp_live[h] - 1) - float_bytes(fp_live[h])
            fp_live[h] -= 1
        taken += 1
    return out
