"""Mixture-of-Depths Attention (mythos/moda.py): the efficient path against an explicit reference,
and the depth entries a looped model's layers read at each iteration."""

import math

import pytest
import torch

from mythos import Mythos, get_variant
from mythos.attention import GroupedQueryAttention
from mythos.moda import DepthMemory, MoDAAttention, moda_attend
from mythos.rope import rope_angles


def reference_moda(q, k, v, dk, dv, allowed):
    """Per query: concatenate the sequence keys/values it may see and its own depth keys/values,
    then one softmax over all of them. q (B, S, H, d); k, v (B, L, Hkv, d); dk, dv (B, S, T, Hkv, d);
    allowed (B, S, L) bool."""
    B, S, H, d = q.shape
    rep = H // k.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        for i in range(S):
            seen = allowed[b, i]
            keys = torch.cat((k[b, seen], dk[b, i]), dim=0).repeat_interleave(rep, dim=1)  # (n, H, d)
            values = torch.cat((v[b, seen], dv[b, i]), dim=0).repeat_interleave(rep, dim=1)
            p = (torch.einsum("hd,nhd->hn", q[b, i], keys) / math.sqrt(d)).softmax(-1)
            out[b, i] = torch.einsum("hn,nhd->hd", p, values)
    return out


def _inputs(B=2, S=5, L=8, H=4, Hkv=2, T=3, d=8):
    torch.manual_seed(3)
    shapes = [(B, S, H, d), (B, L, Hkv, d), (B, L, Hkv, d), (B, S, T, Hkv, d), (B, S, T, Hkv, d)]
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("S, L, T, Hkv", [(6, 6, 1, 2), (1, 9, 4, 2), (3, 9, 2, 1), (5, 5, 3, 4)])
def test_efficient_path_equals_explicit_concatenation_forward_and_backward(S, L, T, Hkv):
    q, k, v, dk, dv = _inputs(S=S, L=L, T=T, Hkv=Hkv)
    out = moda_attend(q, k, v, (dk, dv), None, 1 / math.sqrt(8))
    causal = torch.arange(L)[None, :] <= torch.arange(S)[:, None] + (L - S)  # last query sees every key
    ref = reference_moda(q, k, v, dk, dv, causal.expand(2, S, L))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, dk, dv], g)
    ref_grads = torch.autograd.grad(ref, [q, k, v, dk, dv], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_padding_mask_and_depth_share_one_softmax():
    q, k, v, dk, dv = _inputs(S=4, L=6)
    allowed = torch.ones(2, 4, 6, dtype=torch.bool).tril(2)
    allowed[1, :, :2] = False  # row 1: two pad keys on the left
    out = moda_attend(q, k, v, (dk, dv), allowed[:, None], 1 / math.sqrt(8))
    torch.testing.assert_close(out, reference_moda(q, k, v, dk, dv, allowed))
    # one softmax, not two averaged: a huge depth score takes all the weight from the sequence keys
    dk_big = dk.detach().clone()
    dk_big[:, :, 0] = 50 * q.detach().view(2, 4, 2, 2, 8)[:, :, :, 0]  # aligned with the group's first query head
    out = moda_attend(q.detach(), k.detach(), v.detach(), (dk_big, dv.detach()), allowed[:, None], 1.0)
    torch.testing.assert_close(out[:, :, 0], dv.detach()[:, :, 0, 0])


def test_without_depth_it_is_plain_gqa():
    torch.manual_seed(0)
    gqa, moda = GroupedQueryAttention(64, 8, 2), MoDAAttention(64, 8, 2)
    moda.load_state_dict(gqa.state_dict())
    x = torch.randn(2, 5, 64)
    rope = rope_angles(torch.arange(5)[None].expand(2, 5), 8, 10000.0)
    torch.testing.assert_close(moda(x, rope, None), gqa(x, rope, None))


def _spy_depth_reads(monkeypatch):
    reads = []
    orig = DepthMemory.read

    def spy(self, layer, rows=None, count=None):
        dk, dv = orig(self, layer, rows, count)
        reads.append((layer, dk.detach().clone(), dv.detach().clone()))
        return dk, dv

    monkeypatch.setattr(DepthMemory, "read", spy)
    return reads


def test_iteration_t_reads_entries_of_e_and_the_states_of_earlier_iterations(monkeypatch):
    cfg = get_variant("debug", moda=True, core_layers=2, prelude_layers=1, max_seq_len=32)
    model = Mythos(cfg).eval()
    captured = {}
    orig_core = model.core.forward

    def keep_e(e, *a, **kw):
        captured["e"] = e
        return orig_core(e, *a, **kw)

    monkeypatch.setattr(model.core, "forward", keep_e)
    reads = _spy_depth_reads(monkeypatch)
    x = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        model(x, n_loops=4)
        reads = list(reads)  # the model's own reads, before the states are recomputed below
        states = [captured["e"]] + _loop_states(model, captured["e"], x)
    assert [(j, dk.shape[2]) for j, dk, _ in reads] == [(j, t + 1) for t in range(4) for j in range(2)]
    rope = rope_angles(torch.arange(7)[None].expand(2, 7), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        written = [model.core.depth_writer(s, rope) for s in states[:4]]  # e, h_1, h_2, h_3
    for j, dk, dv in reads:
        for s in range(dk.shape[2]):
            torch.testing.assert_close(dk[:, :, s], written[s][j][0])
            torch.testing.assert_close(dv[:, :, s], written[s][j][1])


def _loop_states(model, e, x):
    """h_1..h_4 of the same forward, from the recurrent block run on its own."""
    S = x.shape[1]
    rope = rope_angles(torch.arange(S)[None].expand(x.shape[0], S), model.cfg.head_dim, model.cfg.rope_theta)
    return model.core(e, rope, None, 4, keep_loop_states=True).loop_states


def test_depth_entries_change_the_output_and_train_under_truncated_backprop():
    torch.manual_seed(0)
    cfg = get_variant("debug", moda=True, act_enabled=False, max_seq_len=32)
    model = Mythos(cfg).train()
    x = torch.randint(0, 256, (2, 9))
    out = model(x, n_loops=6, bptt_depth=2, targets=x)
    out.loss.backward()
    writer = model.core.depth_writer
    assert writer.proj[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # zeroing the depth values changes the logits: the entries are read
        before = model(x, n_loops=6).logits
        writer.proj[0].weight[cfg.n_kv_heads * cfg.head_dim:] = 0
        after = model(x, n_loops=6).logits
    assert (before - after).abs().max() > 1e-4
