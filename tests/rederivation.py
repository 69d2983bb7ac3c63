"""An independent re-derivation of spec §1 (per query, per block, explicit matrices), to check the reference.

Written separately from `natsl.reference`: the softmax branch loops over queries and builds K(t) from the block
types explicitly; the linear branch walks block by block with explicit `[K, K]` transition matrices per token (the
block's real run R, and its decay-only product Δ), carrying `S' = D S + m (R(S) − Δ S)` (revised §1.7).
"""

from __future__ import annotations

import torch


def blocks_of(T, C, cu):
    """List of sequences, each a list of (start, end) blocks."""
    bounds = [0, T] if cu is None else list(cu)
    seqs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        seqs.append([(b, min(b + C, e)) for b in range(s, e, C)])
    return seqs


def rederive(q_s, k_s, v_s, q_l, k_l, v_l, gate_s, gate_l, *, backend, g, beta, C, diagonal, decay_through,
             init=None, cu=None):
    """gate_s, gate_l: [B, N, Hr] gates (m_A, m_L), hard in value. diagonal: "both" or "linear". Everything float64.
    Returns (o_s, o_l, final)."""
    B, T, HA, _ = q_s.shape
    HL, K, V = q_l.shape[2], q_l.shape[3], v_l.shape[3]
    Hr = gate_s.shape[2]
    seqs = blocks_of(T, C, cu)
    flat = [blk for seq in seqs for blk in seq]
    sc_s, sc_l = q_s.shape[-1] ** -0.5, K ** -0.5

    o_s_rows = {}
    for b in range(B):
        for a in range(HA):
            r = a // (HA // Hr)
            for seq in seqs:
                for i, (bs, be) in enumerate(seq):
                    for t in range(bs, be):
                        keys, wts = [], []
                        for j in range(i):
                            js, je = seq[j]
                            gj = flat.index((js, je))
                            for s in range(js, je):
                                keys.append(s)
                                wts.append(gate_s[b, gj, r])
                        if diagonal != "linear":
                            for s in range(bs, t + 1):
                                keys.append(s)
                                wts.append(torch.ones((), dtype=torch.float64))
                        if not keys:
                            o_s_rows[(b, t, a)] = torch.zeros(v_s.shape[-1], dtype=torch.float64)
                            continue
                        sc = torch.stack([q_s[b, t, a] @ k_s[b, s, a] * sc_s for s in keys])
                        e = torch.exp(sc - sc.max().detach()) * torch.stack(wts)
                        z = e.sum()
                        vs = torch.stack([v_s[b, s, a] for s in keys])
                        o_s_rows[(b, t, a)] = (e[:, None] * vs).sum(0) / z if z != 0 else torch.zeros_like(vs[0])
    o_s = torch.stack([torch.stack([torch.stack([o_s_rows[(b, t, a)] for a in range(HA)]) for t in range(T)])
                       for b in range(B)])

    eye = torch.eye(K, dtype=torch.float64)

    def transition(b, h, t):
        """(A, Bm, Dt) with S_new = A @ S + Bm the real update of token t of head h, and Dt its decay alone."""
        kt, vt = k_l[b, t, h], v_l[b, t, h]
        if backend in ("gdn", "mamba2"):
            Dt = torch.exp(g[b, t, h]) * eye
        elif backend == "gla":
            Dt = torch.diag(torch.exp(g[b, t, h]))
        else:
            Dt = eye
        if backend in ("gdn", "deltanet"):
            bt = beta[b, t, h]
            return (eye - bt * torch.outer(kt, kt)) @ Dt, bt * torch.outer(kt, vt), Dt
        return Dt, torch.outer(kt, vt), Dt

    o_l = {}
    finals = []
    for n, seq in enumerate(seqs):
        for b in range(B):
            row = []
            for h in range(HL):
                r = h // (HL // Hr)
                S = torch.zeros(K, V, dtype=torch.float64) if init is None else init[n if cu is not None else b, h]
                for bs, be in seq:
                    gi = flat.index((bs, be))
                    m = gate_l[b, gi, r]
                    linear = bool(gate_l[b, gi, r].detach() == 1)  # the gates are hard in value: 1 = routed linear
                    Sv, Dec = S, eye
                    for t in range(bs, be):  # the real run from the block's start state (read by its queries)
                        A, Bm, Dt = transition(b, h, t)
                        Sv = A @ Sv + Bm
                        Dec = Dt @ Dec
                        o_l[(b, t, h)] = sc_l * Sv.T @ q_l[b, t, h]
                    W = Sv - Dec @ S  # the block's write R(S) - Δ(S)
                    S = (Dec if decay_through or linear else eye) @ S + m * W
                row.append(S)
            finals.append((n if cu is not None else b, torch.stack(row)))
    o_l = torch.stack([torch.stack([torch.stack([o_l[(b, t, h)] for h in range(HL)]) for t in range(T)])
                       for b in range(B)])
    finals.sort(key=lambda x: x[0])
    return o_s, o_l, torch.stack([f for _, f in finals])
