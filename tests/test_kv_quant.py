"""Quantized KV storage (kvstore.QuantStore, KIVI) against naive references written in this file from the
definition (plain loops): per-group asymmetric min/max codes and their bit packing, the residual and its
group-at-a-time flush, decode attention as dequantize-then-attend (torch path here, the Triton kernel in
the interpreter), the allocated bytes against the formula, every kind of strategy on a quantized store,
compiled equal to eager with no recompile."""
import math

import pytest
import torch
from torch._dynamo.utils import counters

import cache as kv
import kvstore
from conftest import in_triton_interpreter, tiny_model
from model import ModelArgs


def naive_quant(xs, bits, dtype):
    """One group (a list of floats): asymmetric min/max, scale and zero rounded to the model dtype first
    -> (codes, scale, zero) as Python numbers."""
    qmax = 2 ** bits - 1
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (arithmetic in fp32, as on the device)
    zero = f32(min(xs)).to(dtype).float()
    scale = ((f32(max(xs)) - zero) / qmax).to(dtype).float()
    codes = [0 if scale == 0 else min(qmax, max(0, round(float((f32(x) - zero) / scale)))) for x in xs]
    return codes, scale.item(), zero.item()


def naive_pack(codes, bits):
    """4 bits (planar): byte j holds channel j at bit 0 and channel j + D / 2 at bit 4. 2 and 8 bits: channel d
    in byte d // (8 / bits) at bit (d % (8 / bits)) * bits."""
    per, n = 8 // bits, len(codes) // (8 // bits)
    if bits == 4:
        return [codes[j] | codes[j + n] << 4 for j in range(n)]
    return [sum(codes[j * per + i] << (i * bits) for i in range(per)) for j in range(n)]


def naive_unpack(byts, bits):
    per = 8 // bits
    if bits == 4:
        return [byte & 15 for byte in byts] + [byte >> 4 for byte in byts]
    return [(byte >> (i * bits)) & (2 ** bits - 1) for byte in byts for i in range(per)]


def make(name, bits, B=2, H=2, S=48, D=16, G=2, group=8, residual=16, dtype=torch.float32, params=None, new=40):
    cfg = kv.CacheConfig(strategy=name, kv_bits=bits, kv_group=group, kv_residual=residual, params=params or {})
    return kv.REGISTRY[name](B, H, S, D, G, dtype, 0, 1, cfg, new)


def drive(cache, T, steps, seed=0):
    """Prefill T random tokens, then `steps` decode steps; -> {(b, h, position): (k, v)} the originals."""
    g = torch.Generator().manual_seed(seed)
    B, H = cache.limit.shape
    D, G, dt = cache.head_dim, cache.n_group, cache.dtype
    k, v = (torch.randn(B, H, T, D, generator=g).to(dt) for _ in range(2))
    pos = torch.arange(T).expand(B, T)
    cache.prefill(torch.randn(B, H * G, T, D, generator=g).to(dt), k, v, pos)
    orig = {(b, h, p): (k[b, h, p], v[b, h, p]) for b in range(B) for h in range(H) for p in range(T)}
    for i in range(steps):
        kn, vn = (torch.randn(B, H, 1, D, generator=g).to(dt) for _ in range(2))
        cache.decode(torch.randn(B, H * G, 1, D, generator=g).to(dt), kn, vn, torch.full((B,), T + i))
        orig.update({(b, h, T + i): (kn[b, h, 0], vn[b, h, 0]) for b in range(B) for h in range(H)})
    return orig


def naive_slots(cache):
    """Every filled slot's (position, key, value) per (b, h), read the way the definition says: below the
    frontier from the packed codes and their group's scale and zero, else from the residual entry. A flat
    head-budget cache: head h's run of its one code row."""
    st = cache.store
    B, H = cache.limit.shape
    D, Gq, bits = cache.head_dim, st.G, st.bits
    front = st.front.tolist()
    flat = isinstance(cache, kv.HeadBudgetCache)
    out = {}
    for b in range(B):
        for h in range(H):
            run = range(int(cache.start[b, h]), int(cache.start[b, h] + cache.count[b, h])) if flat else range(cache.n_slots)
            c = 0 if flat else h
            for s in run:
                p = int(cache.pos[b, s] if flat else cache.pos[b, h, s])
                if p < 0:
                    continue
                if p < front[b]:
                    kc = naive_unpack(st.kq[b, c, s].tolist(), bits)
                    vc = naive_unpack(st.vq[b, c, s].tolist(), bits)
                    ks, kz = st.ks[b, c, s // Gq].float().tolist(), st.kz[b, c, s // Gq].float().tolist()
                    vs, vz = st.vs[b, c, s].float().tolist(), st.vz[b, c, s].float().tolist()
                    key = [kc[d] * ks[d] + kz[d] for d in range(D)]
                    val = [vc[d] * vs[d // Gq] + vz[d // Gq] for d in range(D)]
                else:
                    r = p % st.Rr
                    assert int(st.rpos[b, h, r]) == p and int(st.rslot[b, h, r]) == s
                    key, val = st.rk[b, h, r].float().tolist(), st.rv[b, h, r].float().tolist()
                out[b, h, s] = (p, torch.tensor(key).to(cache.dtype).float(), torch.tensor(val).to(cache.dtype).float())
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_are_kivi_groups_packed(bits, dtype):
    """A full cache after prefill and 40 decode steps (slot = position): every key group of 8 slots below the
    frontier is per-channel min/max over exactly its 8 original keys, every value per token over groups of 8
    channels, packed as naive_pack says; the newest R..R+G-1 tokens sit in the residual, exact."""
    c = make("full", bits, S=96, dtype=dtype)
    orig = drive(c, 37, 40)
    st, now = c.store, 76
    F = (now + 1 - 16) // 8 * 8
    assert st.front.tolist() == [F, F]
    for b in range(2):
        for h in range(2):
            for g0 in range(0, F, 8):
                keys = [orig[b, h, p][0].float().tolist() for p in range(g0, g0 + 8)]
                for d in range(16):
                    codes, scale, zero = naive_quant([k[d] for k in keys], bits, dtype)
                    assert st.ks[b, h, g0 // 8, d].float().item() == scale and st.kz[b, h, g0 // 8, d].float().item() == zero
                    assert [naive_unpack(st.kq[b, h, p].tolist(), bits)[d] for p in range(g0, g0 + 8)] == codes
            for p in range(F):
                val, codes = orig[b, h, p][1].float().tolist(), []
                for j in range(2):
                    cj, scale, zero = naive_quant(val[8 * j:8 * j + 8], bits, dtype)
                    codes += cj
                    assert (st.vs[b, h, p, j].float().item(), st.vz[b, h, p, j].float().item()) == (scale, zero)
                assert st.vq[b, h, p].tolist() == naive_pack(codes, bits)
            for p in range(F, now + 1):
                assert torch.equal(st.rk[b, h, p % 24], orig[b, h, p][0]) and int(st.rslot[b, h, p % 24]) == p


@pytest.mark.parametrize("name,params", [("l2", {}), ("h2o", {}), ("tova", {"tova_per_head": True}), ("random", {}),
                                         ("scissorhands", {"sh_history": 8})])
def test_evicting_policy_requantizes_groups_within_bound(name, params):
    """An evicting policy overwrites single slots: one token a step leaves the residual (which holds the newest
    R exactly) and its key group is re-quantized with a range that only widens, so a member is re-rounded (by
    at most half a step) only when its group's range grows: every cached key stays within 1.5 current grid
    steps of its original (measured max 1.41 over these five policies at 2, 4 and 8 bits, 1.24 when G tokens
    were flushed every G steps; a slot = position cache: 0.5), every value within half a step."""
    c = make(name, 4, S=40, params=params)
    orig = drive(c, 30, 80)
    slots = naive_slots(c)
    st = c.store
    assert st.front.tolist() == [30 + 79 + 1 - 16] * 2  # now + 1 - R: the newest 16 in the residual
    for (b, h, s), (p, key, val) in slots.items():
        k0, v0 = orig[b, h, p]
        if p >= int(st.front[b]):
            assert torch.equal(key, k0.float()) and torch.equal(val, v0.float())
            continue
        step_k = st.ks[b, h, s // 8].float()
        assert ((key - k0).abs() <= step_k * 1.5 + 1e-5).all(), (name, p, (key - k0).abs() / step_k)
        step_v = st.vs[b, h, s].float().repeat_interleave(8)
        assert ((val - v0).abs() <= step_v * 0.5 + 1e-5).all()
    assert len(slots) >= 30  # the cache is full and has evicted


@pytest.mark.parametrize("name", ["full", "h2o"])
def test_cache_smaller_than_a_group_keeps_every_token(name):
    """A cache of 6 slots (below one key group of 8) still holds a residual of one group: the newest token
    enters through it. Capped at 0 slots' worth, every token of an evicting store was flushed before it was
    written (generate.py's h2o at 4 bits on a short prompt printed "the the the"); every cached key must stay
    within its group's grid."""
    c = make(name, 4, S=6, new=20)
    orig = drive(c, 6, 20)
    st = c.store
    assert st.R == 8
    for (b, h, s), (p, key, val) in naive_slots(c).items():
        step = st.ks[b, h, s // 8].float() if p < int(st.front[b]) else torch.zeros(16)
        assert ((key - orig[b, h, p][0].float()).abs() <= step * 1.5 + 1e-5).all(), (name, p)


def naive_attention(qg, slots, B, H):
    """softmax(q.k / sqrt(D)) v over the given slots, plain Python in float64."""
    D = qg.shape[-1]
    out = torch.zeros(qg.shape, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            rows = [kv_ for (bb, hh, _), kv_ in slots.items() if (bb, hh) == (b, h)]
            for g in range(qg.shape[2]):
                logits = [sum(x * y for x, y in zip(qg[b, h, g].tolist(), key.tolist())) / math.sqrt(D) for _, key, _ in rows]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                for (_, _, val), w in zip(rows, e):
                    out[b, h, g] += w / sum(e) * val.double()
    return out


@pytest.mark.parametrize("name", ["full", "l2", "h2o"])
def test_cpu_attention_is_dequantize_then_attend(name):
    """The store's CPU path (plain and with the new token's probabilities) equals naive_slots + softmax."""
    c = make(name, 2, S=40)
    drive(c, 30, 21)
    qg = torch.randn(2, 2, 2, 16, generator=torch.Generator().manual_seed(5))
    want = naive_attention(qg, naive_slots(c), 2, 2)
    got = c.store.attend(qg, c.pos, None, mask=c.pos >= 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    zeros = torch.zeros(2, 2, 1, 16)  # a new token with logit 0 and value 0: shifts probabilities, not out's direction
    out, probs = c.store.attend_with_new(qg, c.pos, None, zeros, zeros)
    assert probs.shape == (2, 2, c.n_slots + 1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2))
    assert (probs[..., :-1][c.pos < 0] == 0).all()


def run_model(model, name, bits, budget, steps, step=None, params=None, T=40, B=2):
    cfg = kv.CacheConfig(strategy=name, max_cache_length=[budget], kv_bits=bits, kv_group=8, kv_residual=16,
                         params=params or {})
    caches = kv.make_caches(model.args, cfg, B, T + steps + 1, steps + 1, "cpu", torch.float32)
    model.setup_caches(caches)
    tokens = torch.randint(0, model.args.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = [model.prefill(tokens, torch.arange(T).expand(B, T))]
        step = step or model.forward
        for i in range(steps):
            out.append(step(out[-1].argmax(-1, keepdim=True), torch.full((B,), T + i))[:, -1].clone())
    return torch.stack(out, 1), caches


STRATEGIES = [("full", "1.0", {}), ("h2o", "0.5", {}), ("l2", "0.5", {}), ("snapkv", "0.5", {}),
              ("quest", "1.0", {"quest_page_size": 4, "quest_dense_layers": []}), ("adakv", "0.5", {})]


@pytest.mark.parametrize("name,budget,params", STRATEGIES)
def test_compiled_equals_eager_without_recompiles(name, budget, params):
    """kv_bits 4 on every kind of policy (full, evicting with and without probabilities, prefill-only,
    retrieval, the flat head-budget layout): the compiled step (fullgraph) gives eager's logits and compiles
    once over 30 steps, during which the residual flushes twice."""
    model = tiny_model(n_layer=2)
    want, _ = run_model(model, name, 4, budget, 30, params=params)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, caches = run_model(model, name, 4, budget, 30, torch.compile(model.forward, fullgraph=True, backend="eager"), params)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(int(c.store.front.min()) >= 48 for c in caches)  # flushed past the prompt's groups


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_allocated_bytes_are_codes_scales_and_residual(bits):
    """cache_bytes = packed codes + scales and zero points (model dtype) + the full-precision residual and its
    bookkeeping + positions and budgets, per layer; and fall with the bits."""
    args = ModelArgs.from_name("tiny")
    args.head_dim = 128  # Llama-3's: the ratios below are the GPU target's (make_caches reads only the shapes)
    B, S, G, R = 2, 2000, 32, 128
    H, D, L = args.n_local_heads, args.head_dim, args.n_layer
    cfg = kv.CacheConfig(kv_bits=bits, kv_group=G, kv_residual=R)
    caches = kv.make_caches(args, cfg, B, S, 10, "cpu", torch.bfloat16)
    Sa = caches[0].n_slots  # allocated in ALLOC_STEP steps
    Sq = -(-Sa // G) * G + G  # whole groups plus the spare one
    codes = 2 * B * H * Sq * D * bits // 8
    scales = 2 * B * H * (Sq // G) * D * 2 + 2 * B * H * Sq * (D // G) * 2
    residual = 2 * B * H * (R + G) * D * 2 + 2 * B * H * (R + G) * 8 + B * 8
    policy = B * H * Sa * 8 + 2 * B * H * 8  # positions, limit, count
    assert kv.cache_bytes(caches) == L * (codes + scales + residual + policy)
    dense = kv.cache_bytes(kv.make_caches(args, kv.CacheConfig(), B, S, 10, "cpu", torch.bfloat16))
    # 2,048 slots: 8-bit 66%, 4-bit 41%, 2-bit 29% of bf16 (int64 positions and the 160-entry residual
    # included); at 32k slots 57%, 33%, 21% (kv_group 64: 55%, 30%, 18%)
    assert kv.cache_bytes(caches) < dense * {8: 0.67, 4: 0.42, 2: 0.29}[bits]


def test_bad_settings_raise():
    # kv_residual 0: the newest token enters through the residual (with none, a group's last token was lost)
    for bad in (dict(kv_bits=3), dict(kv_bits=4, kv_group=24), dict(kv_bits=4, kv_residual=20), dict(kv_bits=4, kv_residual=0)):
        with pytest.raises(ValueError, match="kv_bits"):
            make("full", bad.pop("kv_bits"), **{("group" if k == "kv_group" else "residual"): v for k, v in bad.items()})


def run_ptx(asm, inputs, n_out):
    """The PTX subset _unpack_asm emits, by the ISA's definitions: prmt.b32 (default mode: result byte i is byte
    c[4i+2:4i] of b:a, sign-replicated if c[4i+3]), shr.u32, lop3.b32 (bit = immLut[a b c]); registers are
    32-bit, $0.. the outputs, then the inputs (which must never be written)."""
    regs = {f"${n_out + i}": x for i, x in enumerate(inputs)}
    val = lambda x: regs[x] if x.startswith("$") else int(x, 0)  # noqa: E731 (a read of an unwritten output fails)
    for ins in filter(None, (x.strip() for x in asm.split(";"))):
        op, rest = ins.split(None, 1)
        d, *a = [x.strip() for x in rest.split(",")]
        assert int(d[1:]) < n_out, f"{ins}: writes an input"
        if op == "prmt.b32":
            src, sel, out = val(a[0]) | val(a[1]) << 32, val(a[2]), 0
            for i in range(4):
                nib = sel >> 4 * i & 15
                byte = src >> 8 * (nib & 7) & 255
                out |= (255 if byte & 128 else 0) << 8 * i if nib & 8 else byte << 8 * i
            regs[d] = out
        elif op == "shr.u32":
            regs[d] = val(a[0]) >> val(a[1])
        elif op == "lop3.b32":
            x, y, z, lut = (val(v) for v in a)
            regs[d] = sum((lut >> ((x >> i & 1) << 2 | (y >> i & 1) << 1 | (z >> i & 1)) & 1) << i for i in range(32))
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("bits,dtype", [(4, torch.bfloat16), (2, torch.bfloat16), (8, torch.float16), (4, torch.float16),
                                        (2, torch.float16)])
def test_unpack_ptx_is_elementwise_per_byte(bits, dtype):
    """The GPU kernel's inline PTX (the interpreter cannot run it): for a register of four packed bytes, piece
    t's two output registers hold, in byte order, 16-bit numbers equal to 2^e + each byte's code t (the
    elementwise contract inline_asm_elementwise needs: which bytes share a register depends on the layout)."""
    import triton_kernels as tk
    per, magic = 8 // bits, 128.0 if dtype == torch.bfloat16 else 1024.0
    asm = tk._unpack_asm(bits, 0x4300 if dtype == torch.bfloat16 else 0x6400)
    g = torch.Generator().manual_seed(0)
    for word in [0, 0xFFFFFFFF] + torch.randint(0, 2 ** 32, (300,), generator=g, dtype=torch.int64).tolist():
        out = run_ptx(asm, [word], 2 * per)
        byts = [word >> 8 * e & 255 for e in range(4)]
        for t in range(per):
            halves = [out[2 * t] & 0xFFFF, out[2 * t] >> 16, out[2 * t + 1] & 0xFFFF, out[2 * t + 1] >> 16]
            got = torch.tensor(halves, dtype=torch.int32).to(torch.int16).view(dtype).float().tolist()
            assert got == [magic + (b >> t * bits & (1 << bits) - 1) for b in byts], (hex(word), t)


# ---- the Triton kernel, in the interpreter ----

def test_flat_head_budget_store_is_dequantize_then_attend():
    """AdaKV's flat layout on a quantized store: each head's run (codes in the shared row, its own residual)
    through the store's CPU path equals naive_slots + softmax."""
    c = make("adakv", 4, S=40, D=32, G=4, new=30)
    drive(c, 40, 30)
    qg = torch.randn(2, 2, 4, 32, generator=torch.Generator().manual_seed(3))
    slots = naive_slots(c)
    assert len({s for (_, _, s) in slots}) > 40 and int(c.store.front.min()) > 40  # flushed into the shared row
    torch.testing.assert_close(c.attend_runs(qg).double(), naive_attention(qg, slots, 2, 2), rtol=1e-5, atol=1e-5)


def check_native(device, dtype):
    """A 16-bit model dequantizes its codes in its own dtype (the kernel's magic-number unpacking): quant_attend
    against naive_slots + softmax within the 16-bit output's rounding, and quant_attend_scores' probabilities
    against the fp32 kernel's (tested against the naive ones in check_kernel)."""
    import triton_kernels as tk
    for name, bits, D in (("full", 2, 64), ("l2", 4, 32), ("h2o", 8, 32)):  # >= 16 bytes a row (QuantStore.kernel)
        c = make(name, bits, S=70, D=D, G=4, dtype=dtype)
        drive(c, 50, 30)
        qg = torch.randn(2, 2, 4, D, generator=torch.Generator().manual_seed(2)).to(dtype)
        want = naive_attention(qg, naive_slots(c), 2, 2)
        c, qg = c.to(device), qg.to(device)
        runs = torch.tensor([0, c.n_slots], device=device).expand(2, 2, 2)
        args = c.store.triton_args(c.pos)
        got = tk.quant_attend(qg, *args, runs, runs, c.n_slots, True)
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-2, atol=1e-2)
        zeros = torch.zeros(2, 2, 1, D, device=device, dtype=dtype)
        probs = tk.quant_attend_scores(qg, *args, zeros, zeros)[1:]
        f32 = [x.float() if x.is_floating_point() else x for x in args[:12]] + list(args[12:])  # the fp32 kernel
        want_p = tk.quant_attend_scores(qg.float(), *f32, zeros.float(), zeros.float())[1:]
        for x, y in zip(probs, want_p):
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 kernel path runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_kernel_native_dtype_cuda(dtype):
    check_native("cuda", dtype)


def check_kernel(device):
    """quant_attend (runs, a flat row's runs, gather) and quant_attend_scores against naive_slots + softmax
    (the kernel dequantizes tiles in registers; the reference reads codes with loops)."""
    from triton_kernels import quant_attend, quant_attend_scores
    import triton_kernels as tk
    check_native(device, torch.float16)  # the interpreter has no bf16
    tune = dict(tk.TUNE["quant_few"])
    tk.TUNE["quant_few"]["block"] = 16  # the residual's 24 entries in two programs (the new token in the first)
    for name, bits, D in (("full", 2, 64), ("l2", 4, 32), ("h2o", 8, 32)):  # every unpacking; slot = position and evicting
        c = make(name, bits, S=70, D=D, G=4)
        drive(c, 50, 30)
        st = c.store
        slots = naive_slots(c)
        # x8 for the 2-bit cache: logits 8 times as spread, so a later tile's max passes the first's by more than the
        # kernel's lazy threshold (8) and it rescales its sums (with x1 a no-op _rescaled passed this test)
        qg = torch.randn(2, 2, 4, D, generator=torch.Generator().manual_seed(2)) * (8 if bits == 2 else 1)
        args = st.triton_args(c.pos)
        runs = torch.tensor([0, c.n_slots]).expand(2, 2, 2)
        got = quant_attend(qg, *args, runs, runs, c.n_slots, True)
        torch.testing.assert_close(got.double(), naive_attention(qg, slots, 2, 2), rtol=1e-4, atol=1e-4)
        k_new, v_new = (torch.randn(2, 2, 1, D, generator=torch.Generator().manual_seed(i)) for i in (6, 7))
        out, p = quant_attend_scores(qg, *args, k_new, v_new)
        with_new = dict(slots) | {(b, h, -1): (-1, k_new[b, h, 0], v_new[b, h, 0]) for b in range(2) for h in range(2)}
        torch.testing.assert_close(out.double(), naive_attention(qg, with_new, 2, 2), rtol=1e-4, atol=1e-4)
        S = c.n_slots
        # each slot's probability (its code's, or its residual entry's), group mean, against naive softmax weights
        probs = torch.cat([p[..., :S].scatter_add(-1, st.rslot.clamp(min=0), p[..., S:-1]), p[..., -1:]], -1)
        for (b, h, s), _ in list(with_new.items())[::7] + [((0, 1, -1), None)]:  # s = -1: the new token (last)
            mean = 0.0
            for g in range(4):
                lg = {ss: sum(x * y for x, y in zip(qg[b, h, g].tolist(), kk.tolist())) / math.sqrt(D)
                      for (bb, hh, ss), (_, kk, _) in with_new.items() if (bb, hh) == (b, h)}
                top = max(lg.values())
                mean += math.exp(lg[s] - top) / sum(math.exp(x - top) for x in lg.values()) / 4
            assert abs(float(probs[b, h, s]) - mean) < 1e-4
        # gather: every third filled slot
        sel = torch.arange(0, c.n_slots, 3).expand(2, 2, -1).contiguous()
        ok = c.pos.gather(2, sel) >= 0
        got = st.attend_gather(qg, c.pos, None, sel, ok)
        chosen = {key: val for key, val in slots.items() if key[2] % 3 == 0}
        torch.testing.assert_close(got.double(), naive_attention(qg, chosen, 2, 2), rtol=1e-4, atol=1e-4)
    tk.TUNE["quant_few"]["block"] = 32  # tiles of 32 slots inside key groups of 64 (the scale row broadcast)
    c = make("full", 4, S=200, D=64, G=4, group=64, residual=64)
    drive(c, 150, 30)
    qg = torch.randn(2, 2, 4, 64, generator=torch.Generator().manual_seed(4))
    runs = torch.tensor([0, c.n_slots]).expand(2, 2, 2)
    got = quant_attend(qg, *c.store.triton_args(c.pos), runs, runs, c.n_slots, True)
    tk.TUNE["quant_few"] = tune
    torch.testing.assert_close(got.double(), naive_attention(qg, naive_slots(c), 2, 2), rtol=1e-4, atol=1e-4)
    c = make("adakv", 2, S=40, D=64, G=4, new=30)  # the flat layout: one code row, each head a run of it
    drive(c, 40, 30)
    qg = torch.randn(2, 2, 4, 64, generator=torch.Generator().manual_seed(3))
    runs = torch.stack([c.start, c.count], -1)
    got = quant_attend(qg, *c.store.triton_args(c.pos[:, None]), runs, runs, c.pos.shape[1], True)
    torch.testing.assert_close(got.double(), naive_attention(qg, naive_slots(c), 2, 2), rtol=1e-4, atol=1e-4)


def check_flush(device):
    """triton_kernels.quant_flush (QuantStore.advance where slots are not positions, one entry a step) against the
    torch flush, step after step: two caches driven alike, one through each. In the interpreter every buffer but the
    spare group (where the torch path parks the writes it does not make) is equal bit for bit after every step; on
    CUDA (whose compiler fuses the dequantization's multiply-add) every code is within one of the torch path's and
    every scale and zero within a 16-bit rounding, for the policies whose choice does not read attention."""
    import triton_kernels as tk
    exact = device == "cpu"
    cases = (("l2", 2, torch.float32), ("h2o", 4, torch.float16), ("snapkv", 8, torch.float32)) if exact else \
        (("l2", 4, torch.float32), ("snapkv", 2, torch.float16))
    channels, tk.FLUSH_CHANNELS = tk.FLUSH_CHANNELS, 16  # a key group's 32 channels in two programs
    try:
        for name, bits, dtype in cases:
            flush_alike(name, bits, dtype, device, exact)
    finally:
        tk.FLUSH_CHANNELS = channels


def flush_alike(name, bits, dtype, device, exact):
    a, b = make(name, bits, S=40, D=32, group=8, dtype=dtype), make(name, bits, S=40, D=32, group=8, dtype=dtype).to(device)
    a.store.flush_kernel, b.store.flush_kernel = False, True
    g = torch.Generator().manual_seed(1)
    B, H, T, D, G = 2, 2, 30, 32, 2
    shapes = [(B, H * G, T, D), (B, H, T, D), (B, H, T, D)]
    x = [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]
    a.prefill(*x, torch.arange(T).expand(B, T))
    b.prefill(*(t.to(device) for t in x), torch.arange(T, device=device).expand(B, T))
    spare = a.store.spare
    flushed = 0
    for i in range(32):
        step = [torch.randn(*shape[:2], 1, D, generator=g).to(dtype) for shape in shapes]
        fronts = a.store.front.clone()
        a.decode(*step, torch.full((B,), T + i))
        b.decode(*(t.to(device) for t in step), torch.full((B,), T + i, device=device))
        flushed += int((a.store.front > fronts).sum())
        assert torch.equal(a.pos, b.pos.cpu()), (name, i)
        for key, n in (("kq", spare * 8), ("vq", spare * 8), ("vs", spare * 8), ("vz", spare * 8), ("ks", spare),
                       ("kz", spare)):
            want, got = getattr(a.store, key)[:, :, :n], getattr(b.store, key)[:, :, :n].cpu()
            if exact:
                assert torch.equal(want, got), (name, bits, i, key)
            elif key.endswith("q"):
                diff = (kvstore.unpack_codes(want, bits).int() - kvstore.unpack_codes(got, bits).int()).abs()
                assert diff.max() <= 1 and diff.float().mean() < 0.01, (name, bits, i, key)
            else:
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    assert flushed == 64 and int(a.store.front.min()) > 40  # every step flushed, slots were reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel runs on CUDA only")
def test_flush_kernel_cuda():
    check_flush("cuda")


def test_flush_kernel_in_interpreter():
    in_triton_interpreter("test_kv_quant", "check_flush")


def test_quant_kernel_in_interpreter():
    in_triton_interpreter("test_kv_quant", "check_kernel")


def test_inductor_equals_eager():
    """The same through inductor (what generate.py --compile and bench.py run) for the most involved path:
    H2O at 2 bits (probabilities over codes and residual, groups re-quantized), 20 steps."""
    # One thread: at 2 bits many keys dequantize alike, so H2O's accumulated scores tie; inductor's logits
    # differ from eager's in the last bits (~1e-6, the order of its reductions), and with 2 threads that
    # order flipped a tie at step 3 (a different, equally valid eviction, then other logits)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(n_layer=2)
        want, _ = run_model(model, "h2o", 2, "0.5", 20)
        torch._dynamo.reset()
        got, _ = run_model(model, "h2o", 2, "0.5", 20, torch.compile(model.forward, fullgraph=True))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
