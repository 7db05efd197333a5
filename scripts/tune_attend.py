"""Launch settings of the decode-attention kernels, timed on the GPU at Llama-3-8B's head shapes (RANDOM data).

    python scripts/tune_attend.py [others] [dense] [gather] [quant] [chosen.json]
        # attend_scores, quest_select, prompt_colsum; dense_attend; gather_attend; quant_attend (KIVI codes):
        # one table per kernel; the chosen dense/gather/quant settings go to chosen.json (bench.py --kernel_tune)
    python scripts/tune_attend.py sass      # no GPU needed: the decode kernels' main loops, instruction by kind
    python scripts/tune_attend.py compare REV   # quant_attend at git revision REV beside the working tree's
    python scripts/tune_attend.py linear    # the decode GEMMs (triton_kernels.decode_linear) against cuBLAS
    python scripts/tune_attend.py linear8   # the same over int8 weights (quant.Int8Linear's decode kernel)
    python scripts/tune_attend.py evict     # eviction's choice (triton_kernels.evict_slot) against its torch form
    python scripts/tune_attend.py scores    # attend_scores' launch settings (attention that stores the logits)

Every time is a CUDA-graph replay median (triton.testing.do_bench_cudagraph), so launch overhead is out
and a kernel is timed as it runs inside the decode step's graph. GB/s counts the K/V rows (and positions,
codes, bounds) each kernel must read at least once. The chosen settings (the least summed
slowdown over the shapes of batch 1, and of batch 8) become triton_kernels.TUNE by hand (its comment
says which run chose them).
"""
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kvstore  # noqa: E402
import triton_kernels as tk  # noqa: E402

H, G, D = 8, 4, 128  # Llama-3-8B: KV heads, query heads per KV head, head_dim


def bench_ms(fn):
    import triton.testing
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def dense_case(B, S, filled):
    qg = torch.randn(B, H, G, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos = torch.arange(S, device="cuda").expand(B, H, S).clone()
    pos[pos >= filled] = -1
    return qg, k, v, pos, torch.tensor([0, filled], device="cuda").expand(B, H, 2).contiguous()  # each row's run


# (rows per tile, warps) tried: 1- and 2-warp programs, first tried on 2026-11-30, won for the dense and the
# quantized kernel at batch 8 (BENCHMARKS.md)
DENSE_SHAPES = [(32, 1), (64, 1), (64, 2), (64, 4), (128, 4), (128, 8)]
QUANT_SHAPES = [(32, 1), (64, 1), (64, 2), (128, 2), (128, 4)]
GATHER_SHAPES = [(16, 1), (32, 1), (32, 2), (16, 4), (32, 4)]


def tune_dense():
    print("| kernel | batch | slots (filled) | block | per SM | warps | stages | us | GB/s |\n|---|---|---|---|---|---|---|---|---|")
    best = {}
    for B, S, filled in [(1, 33792, 32769), (8, 33792, 32769), (1, 3300, 3300), (8, 3300, 3300)]:
        qg, k, v, pos, runs = dense_case(B, S, filled)
        gb = B * H * filled * (2 * D * 2 + 8) / 1e9
        for (block, warps), per_sm, stages in itertools.product(DENSE_SHAPES, [2, 4, 8, 16], [3]):
            tk.TUNE["dense_few" if B * H <= 16 else "dense"] = dict(block=block, per_sm=per_sm, warps=warps, stages=stages)
            try:
                ms = bench_ms(lambda: tk.dense_attend(qg, k, v, pos, runs, S))
            except Exception as e:  # out of shared memory, say: skip the variant
                print(f"| dense_attend | {B} | {S} | {block} | {per_sm} | {warps} | {stages} | "
                      f"failed: {type(e).__name__} {str(e)[:60]} | |")
                continue
            best.setdefault((B, S), []).append((ms, block, per_sm, warps, stages))
            print(f"| dense_attend | {B} | {S} ({filled}) | {block} | {per_sm} | {warps} | {stages} | {1e3 * ms:.1f} | {gb / ms * 1e3:.0f} |", flush=True)
    return {"dense": pick({k: v for k, v in best.items() if k[0] * H > 16}),
            "dense_few": pick({k: v for k, v in best.items() if k[0] * H <= 16})}


def pick(times):
    """The one setting with the least summed slowdown against each shape's fastest: {(B, S): [(ms, *setting)]}."""
    fastest = {shape: min(r[0] for r in rows) for shape, rows in times.items()}
    loss = {}
    for shape, rows in times.items():
        for ms, *setting in rows:
            loss[tuple(setting)] = loss.get(tuple(setting), 0) + ms / fastest[shape]
    block, per_sm, warps, stages = min(loss, key=loss.get)
    print(f"chosen: block {block}, per_sm {per_sm}, warps {warps}, stages {stages} "
          f"(mean slowdown {loss[block, per_sm, warps, stages] / len(times):.3f} against each shape's fastest)")
    return dict(block=block, per_sm=per_sm, warps=warps, stages=stages)


def tune_scores():
    """attend_scores (dense attention that also stores the logits: H2O, TOVA, Scissorhands) over a 10% budget of 32k
    at batch 1 and 8, dense_attend at its committed setting beside it: the logits' stores may move the best launch."""
    best = {}
    print("| kernel | batch | slots | block | per SM | warps | stages | us |\n|---|---|---|---|---|---|---|---|")
    for B in (1, 8):
        qg, k, v, pos, runs = dense_case(B, 3300, 3300)
        k_new, v_new = (torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = bench_ms(lambda: tk.dense_attend(qg, k, v, pos, runs, 3300))
        print(f"| dense_attend (committed) | {B} | 3300 | | | | | {1e3 * ms:.1f} |", flush=True)
        key = "scores_few" if B * H <= 16 else "scores"
        committed = dict(tk.TUNE[key])
        for (block, warps), per_sm, stages in itertools.product(DENSE_SHAPES, [2, 4, 8], [3]):
            tk.TUNE[key] = dict(block=block, per_sm=per_sm, warps=warps, stages=stages)
            ms = bench_ms(lambda: tk.attend_scores(qg, k, v, pos, k_new, v_new))
            best.setdefault((B, 3300), []).append((ms, block, per_sm, warps, stages))
            print(f"| attend_scores | {B} | 3300 | {block} | {per_sm} | {warps} | {stages} | {1e3 * ms:.1f} |", flush=True)
        tk.TUNE[key] = committed
    return {"scores": pick({k: v for k, v in best.items() if k[0] * H > 16}),
            "scores_few": pick({k: v for k, v in best.items() if k[0] * H <= 16})}


def tune_gather():
    times = {}
    print("| kernel | batch | selected of slots | block | per SM | warps | stages | us | GB/s |\n|---|---|---|---|---|---|---|---|---|")
    for B in (1, 8):
        S, K = 33792, 3449  # Spotlight 90% pruned at 32k: k + sinks + recent + 1
        qg, k, v, _, _ = dense_case(B, S, S)
        idx = torch.rand(B, H, S, device="cuda").argsort(-1)[..., :K].sort(-1).values
        ok = torch.ones(B, H, K, dtype=torch.bool, device="cuda")
        gb = B * H * K * (2 * D * 2 + 9) / 1e9
        for (block, warps), per_sm, stages in itertools.product(GATHER_SHAPES, [2, 4, 8], [2]):
            tk.TUNE["gather_few" if B * H <= 16 else "gather"] = dict(block=block, per_sm=per_sm, warps=warps, stages=stages)
            ms = bench_ms(lambda: tk.gather_attend(qg, k, v, idx, ok))
            times.setdefault((B, S), []).append((ms, block, per_sm, warps, stages))
            print(f"| gather_attend | {B} | {K} of {S} | {block} | {per_sm} | {warps} | {stages} | {1e3 * ms:.1f} | {gb / ms * 1e3:.0f} |", flush=True)
    return {"gather": pick({k: v for k, v in times.items() if k[0] * H > 16}),
            "gather_few": pick({k: v for k, v in times.items() if k[0] * H <= 16})}


def quant_case(B, S, filled, bits, group=32, residual=128):
    """A QuantStore's buffers (kvstore.QuantStore.triton_args) with random codes, slot = position, the
    frontier at the last whole group below filled - residual, the residual's R + G entries live."""
    gen = dict(device="cuda")
    Sq, Dp, Rr = -(-S // group) * group + group, D * bits // 8, residual + group
    kq, vq = (torch.randint(0, 256, (B, H, Sq, Dp), dtype=torch.uint8, **gen) for _ in range(2))
    ks, kz = (torch.rand(B, H, Sq // group, D, dtype=torch.bfloat16, **gen) for _ in range(2))
    vs, vz = (torch.rand(B, H, Sq, D // group, dtype=torch.bfloat16, **gen) for _ in range(2))
    pos = torch.arange(S, **gen).expand(B, H, S).clone()
    pos[pos >= filled] = -1
    front = torch.full((B,), (filled - residual) // group * group, **gen)
    rk, rv = (torch.randn(B, H, Rr, D, dtype=torch.bfloat16, **gen) for _ in range(2))
    rpos = (filled - Rr + torch.arange(Rr, **gen)).expand(B, H, Rr).contiguous()  # the newest R + G positions
    qg = torch.randn(B, H, G, D, dtype=torch.bfloat16, **gen)
    runs = torch.tensor([0, S], **gen).expand(B, H, 2)
    args = (qg, kq, ks, kz, vq, vs, vz, pos, front, rk, rv, rpos, rpos, None, bits, group, bits in kvstore.PLANAR_BITS,
            runs, runs, S, True)
    return args, B * H * filled * (2 * Dp + 2 * 2 * 2 * D / group + 8) / 1e9  # codes, scales and zeros, positions


def tune_quant():
    """quant_attend at 32k slots (the full cache) and 3.3k (a 10% budget of 32k, eviction stacked on the codes), 4 and
    2 bits: dequantizing in fp32 (an fp32 model's path) at the committed setting, then launch settings for
    dequantizing in the model's bf16."""
    print("| kernel | batch | slots | bits | variant | block | per SM | warps | stages | us | GB/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    best = {}
    for (B, S, filled), bits in itertools.product([(b, s, f) for b in (1, 8) for s, f in ((33792, 32769), (3328, 3300))],
                                                  (4, 2)):
        args, gb = quant_case(B, S, filled, bits)
        key = "quant_few" if B * H <= 16 else "quant_short" if S <= tk.QUANT_SHORT else "quant"
        committed = dict(tk.TUNE[key])
        settings = [("fp32", tuple(committed.values()))] + [
            ("bf16", (block, per_sm, warps, 3)) for (block, warps), per_sm in itertools.product(QUANT_SHAPES, [4, 8, 16, 32])]
        for variant, (block, per_sm, warps, stages) in settings:
            tk.NATIVE_DEQUANT = variant == "bf16"
            tk.TUNE[key] = dict(block=block, per_sm=per_sm, warps=warps, stages=stages)
            cells = f"| quant_attend | {B} | {S} | {bits} | {variant} | {block} | {per_sm} | {warps} | {stages} |"
            try:
                ms = bench_ms(lambda: tk.quant_attend(*args))
            except Exception as e:  # out of shared memory, say: skip the variant
                print(f"{cells} failed: {type(e).__name__} | |")
                continue
            if variant == "bf16":
                best.setdefault((B, S, bits), []).append((ms, block, per_sm, warps, stages))
            print(f"{cells} {1e3 * ms:.1f} | {gb / ms * 1e3:.0f} |", flush=True)
        tk.TUNE[key], tk.NATIVE_DEQUANT = committed, True
    return {"quant": pick({k: v for k, v in best.items() if k[0] * H > 16 and k[1] > tk.QUANT_SHORT}),
            "quant_short": pick({k: v for k, v in best.items() if k[0] * H > 16 and k[1] <= tk.QUANT_SHORT}),
            "quant_few": pick({k: v for k, v in best.items() if k[0] * H <= 16})}


def compare(rev):
    """quant_attend of triton_kernels.py at git revision `rev` beside the working tree's, at each one's committed
    launch settings and at the other's, 32k filled, 4 and 2 bits, batch 8 and 1 (one process: the A/B of a kernel
    change). The old file is loaded as a module of its own, its ops registered under another namespace."""
    import importlib.util
    import subprocess
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:triton_kernels.py"], cwd=root, capture_output=True, text=True,
                         check=True).stdout.replace("kvcompress::", "kvcompare::")
    path = Path("/tmp") / f"triton_kernels_{rev}.py"  # Triton reads a jit function's source from its file
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"triton_kernels_{rev}", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    kernels = {rev: old, "working tree": tk}
    before_planar = "planar" not in src  # quant_attend's signature before the 4-bit planar layout (no planar flag)
    print("| batch | bits | kernel | launch (block/per SM/warps/stages) | us |\n|---|---|---|---|---|")
    for B, bits in itertools.product((8, 1), (4, 2)):
        args, _ = quant_case(B, 33792, 32769, bits)
        key = "quant_few" if B * H <= 16 else "quant"
        settings = {name: dict(m.TUNE[key]) for name, m in kernels.items()}
        for name, m in kernels.items():
            for setting in settings.values():
                m.TUNE[key] = setting
                a = args
                if m is old and "rsel" not in src:  # before the kernel found the residual's live entries: a mask
                    a = a[:11] + (a[12] >= 0,) + a[14:]
                a = a[:14] + a[15:] if m is old and before_planar else a
                ms = bench_ms(lambda: m.quant_attend(*a))
                print(f"| {B} | {bits} | {name} | {'/'.join(map(str, setting.values()))} | {1e3 * ms:.1f} |", flush=True)
            m.TUNE[key] = settings[name]


def time_others():
    print("| kernel | shape | us | GB/s or TFLOP/s |\n|---|---|---|---|")
    for B in (1, 8):
        qg, k, v, pos, _ = dense_case(B, 3300, 3300)
        k_new, v_new = (torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ms = bench_ms(lambda: tk.attend_scores(qg, k, v, pos, k_new, v_new))
        print(f"| attend_scores | B={B}, 3300 slots | {1e3 * ms:.1f} | {B * H * 3300 * 520 / ms / 1e6:.0f} GB/s |", flush=True)
        P, ps, S = 2112, 16, 33792
        kmax, kmin = (torch.randn(B, H, P, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ip = torch.full((B,), 32768, device="cuda")
        n_sel = torch.full((B,), math.ceil(0.1 * 32769 / ps) - 1, device="cuda")
        K = math.ceil(0.1 * S / ps)
        ms = bench_ms(lambda: tk.quest_select(qg, kmax, kmin, ip, n_sel, K, ps, S, False))
        print(f"| quest_select | B={B}, {P} pages | {1e3 * ms:.1f} | {B * H * P * D * 4 / ms / 1e6:.0f} GB/s |", flush=True)
    B, T = 8, 32768
    q = torch.randn(B, 4 * H, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda").expand(B, T)
    for rows in (T, 32, 1):
        torch.cuda.synchronize()
        tk.prompt_colsum(q, k, pos, rows)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        tk.prompt_colsum(q, k, pos, rows)
        ev[1].record()
        torch.cuda.synchronize()
        ms = ev[0].elapsed_time(ev[1])
        flops = 2 * 2 * D * 4 * H * B * (T * T / 2 if rows == T else rows * T)  # two QK^T passes
        print(f"| prompt_colsum | B={B}, T={T}, rows={rows}, one layer | {1e3 * ms:.0f} | {flops / ms / 1e9:.0f} TFLOP/s |", flush=True)


# Llama-3-8B's weights (N, K): wqkv, wo, w1 (= w3), w1 and w3 stacked, w2, the output projection
LINEAR_SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w1": (14336, 4096), "w13": (28672, 4096),
                 "w2": (4096, 14336), "output": (128256, 4096)}
LINEAR_SETTINGS = list(itertools.product([16, 32, 64], [128, 256, 512], [4, 8], [3, 5]))  # block_n, block_k, warps, stages
INT8_SETTINGS = list(itertools.product([16, 32, 64], [256, 512, 1024], [4, 8], [3, 4]))


def tune_linear(int8=False):
    """triton_kernels.decode_linear against cuBLAS (F.linear) at batch 1 and 8 for each weight shape; int8: over
    int8 codes with per-output scales (quant.Int8Linear), beside cuBLAS and decode_linear on the bf16 weight. Each
    timed call runs over copies of W that together exceed the H200's 50 MB L2 (a decode step never finds a
    weight in L2: the other 14 GB pass in between), timed per copy. GB/s counts W's bytes (int8: codes)."""
    import torch.nn.functional as F
    print("| weight | batch | kernel | block_n | block_k | warps | stages | us | GB/s |\n|---|---|---|---|---|---|---|---|---|")
    tune_name = "INT8_TUNE" if int8 else "LINEAR_TUNE"
    committed, best = dict(getattr(tk, tune_name)), {}
    for (name, (N, K)), M in itertools.product(LINEAR_SHAPES.items(), (1, 8)):
        copies = max(1, math.ceil(400e6 / (N * K * (1 if int8 else 2))))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        gb = N * K * (1 if int8 else 2) / 1e9
        ref = F.linear(x, ws[0])
        ms = bench_ms(lambda: [F.linear(x, w) for w in ws]) / copies
        print(f"| {name} | {M} | cuBLAS, bf16 W | | | | | {1e3 * ms:.1f} | {N * K * 2 / ms / 1e6:.0f} |", flush=True)
        args = [(w,) for w in ws]
        if int8:
            ms = bench_ms(lambda: [tk.decode_linear(x, w) for w in ws]) / copies
            print(f"| {name} | {M} | triton, bf16 W | committed | | | | {1e3 * ms:.1f} | {N * K * 2 / ms / 1e6:.0f} |", flush=True)
            scales = torch.rand(N, device="cuda", dtype=torch.bfloat16) / 64
            args = [(torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8), scales) for _ in range(copies)]
            del ws
            ref = F.linear(x.float(), args[0][0].float() * scales.float()[:, None])  # fp32: bf16 W rounds too much
        tol = dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        for bn, bk, warps, stages in INT8_SETTINGS if int8 else LINEAR_SETTINGS:
            setting = dict(block_n=bn, block_k=bk, warps=warps, stages=stages)
            setattr(tk, tune_name, {"narrow": setting, "wide": setting} if int8 else setting)
            try:
                torch.testing.assert_close(tk.decode_linear(x, *args[0]).float(), ref.float(), **tol)
                ms = bench_ms(lambda: [tk.decode_linear(x, *a) for a in args]) / copies
            except Exception as e:  # out of shared memory, say: skip the setting
                print(f"| {name} | {M} | triton | {bn} | {bk} | {warps} | {stages} | failed: {type(e).__name__} | |")
                continue
            best.setdefault((name, M), []).append((ms, bn, bk, warps, stages))
            print(f"| {name} | {M} | triton{', int8 W' if int8 else ''} | {bn} | {bk} | {warps} | {stages} | {1e3 * ms:.1f} | "
                  f"{gb / ms * 1e3:.0f} |", flush=True)
        del args
    setattr(tk, tune_name, committed)
    print("\nBest setting per shape; then the settings by summed time over a layer (wqkv + wo + w13 + w2) at each batch:")
    for key, rows in best.items():
        print(key, min(rows))
    for M in (1, 8):
        total = {}
        for name in ("wqkv", "wo", "w13", "w2"):
            for ms, *setting in best.get((name, M), []):
                total[tuple(setting)] = total.get(tuple(setting), 0) + ms
        for setting, ms in sorted(total.items(), key=lambda kv: kv[1])[:5]:
            print(f"batch {M}: layer {1e3 * ms:.1f} us at block_n/block_k/warps/stages {setting}")


def tune_evict():
    """Eviction's choice at a 10% budget of 32k (3,277 slots) and batch 1 and 8: triton_kernels.evict_slot at each
    tile and warp count, against choose_slot's torch form compiled (cache.EVICT_KERNEL off), for H2O (scores, a
    fractional window) and StreamingLLM (positions, 4 sinks)."""
    import cache as kv
    print("| policy | batch | form | chunk | warps | us |\n|---|---|---|---|---|---|")
    committed = tk.EVICT_CHUNK, tk.EVICT_WARPS
    for name, B in itertools.product(("h2o", "streamingllm"), (1, 8)):
        cfg = kv.CacheConfig(strategy=name)
        c = kv.REGISTRY[name](B, H, 3277, D, G, torch.bfloat16, 0, 32, cfg).cuda()
        c.limit.fill_(3277)
        c.pos.copy_(torch.stack([torch.randperm(32768, device="cuda")[:3277] for _ in range(B * H)]).view(B, H, -1))
        now = torch.full((B,), 32768, device="cuda")
        keep = None if name == "streamingllm" else torch.rand(B, H, 3278, device="cuda")
        kv.EVICT_KERNEL = False
        torch_form = torch.compile(lambda keep, now: c.choose_slot(keep, now), fullgraph=True)
        ref = torch_form(c.decode_scores(None, None, now) if keep is None else keep, now)
        ms = bench_ms(lambda: torch_form(c.decode_scores(None, None, now) if keep is None else keep, now))
        print(f"| {name} | {B} | torch, compiled | | | {1e3 * ms:.1f} |", flush=True)
        kv.EVICT_KERNEL = True
        for chunk, warps in itertools.product((128, 256, 512, 1024, 2048), (1, 2, 4, 8)):
            tk.EVICT_CHUNK, tk.EVICT_WARPS = chunk, warps
            assert torch.equal(c.choose_slot(keep, now), ref)
            ms = bench_ms(lambda: c.choose_slot(keep, now))
            print(f"| {name} | {B} | evict_slot | {chunk} | {warps} | {1e3 * ms:.1f} |", flush=True)
        tk.EVICT_CHUNK, tk.EVICT_WARPS = committed


# the decode kernels' pointer arguments as a bf16 model launches them (loop_sass's signature)
SASS_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "KQ": "*u8", "VQ": "*u8", "KS": "*bf16", "KZ": "*bf16",
                 "VS": "*bf16", "VZ": "*bf16", "IDX": "*i64", "OK": "*i64", "POS": "*i64", "FRONT": "*i64",
                 "PO": "*fp32", "PM": "*fp32", "PL": "*fp32", "PS": "*fp32",
                 "KN": "*bf16", "VN": "*bf16", "RK": "*bf16", "RV": "*bf16", "RSLOT": "*i64", "RPOS": "*i64", "RSEL": "*i8"}


def loop_sass(fn, pointers: dict, consts: dict, warps: int, stages: int):
    """fn compiled for sm_90 (H100/H200) on this machine, no GPU needed: the SASS of its main loop (the longest
    backward branch) -> (instructions in the loop, {opcode: count}, the instructions inside the loop's forward
    branches: a conditional block, e.g. the quantized kernel's lazy rescale, that most tiles jump over).
    Integer arguments get the divisibility by 16 that a launch gives aligned tensors, so loads vectorise as on
    the GPU."""
    import collections
    import re
    import subprocess
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "scale" else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts and n != "scale"}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    cubin = Path("/tmp") / f"tune_attend_{fn.__name__}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    text = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    at = {}  # label -> address of its first instruction
    code = []  # (address, opcode, branch target label)
    label = None
    for line in text.splitlines():
        if m := re.match(r"(\.L_x_\d+):", line.strip()):
            label = m.group(1)
        elif m := re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*?(\.L_x_\d+)?\W*;", line):
            addr = int(m.group(1), 16)
            if label:
                at[label], label = addr, None
            code.append((addr, m.group(2), m.group(3)))
    spans = [(at[t], a) for a, op, t in code if op == "BRA" and t in at and at[t] < a]
    if not spans:
        raise ValueError(f"{fn.__name__}: no loop in its SASS")
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    ops = collections.Counter(op for a, op, _ in code if lo <= a <= hi)
    inside = [(a, at[t]) for a, op, t in code if op == "BRA" and t in at and lo <= a < at[t] <= hi]
    return sum(ops.values()), ops, sum(1 for a, _, _ in code if any(x < a < y for x, y in inside))


def sass():
    """The per-tile instruction budget of the decode kernels at Llama-3-8B's head shapes, at the batch-8 launch
    settings of triton_kernels.TUNE and at the 4-warp tiles they replaced: where a quantized tile's
    instructions go against a dense one's. Per token: warp instructions (each thread's count x warps / tokens),
    what the SM's schedulers issue. BENCHMARKS.md says where these counts tracked the times and where not."""
    print("| kernel | tokens per tile | warps | loop instructions per thread | of which branches skip | "
          "warp instructions per token (none skipped) | top opcodes |\n|---|---|---|---|---|---|---|")
    base = dict(G=G, GP=16, D=D, DENSE=True, SCORES=False, CHUNK=4096)
    dense, quant = tk.TUNE["dense"], tk.TUNE["quant"]
    cases = [("dense_attend, bf16", tk._attend_kernel, dict(base, BLOCK=b, RAGGED=False, NEW=False), w)
             for b, w in ((dense["block"], dense["warps"]), (64, 4))]
    for bits, native in ((4, True), (2, True), (4, False)):
        for b, w in ((quant["block"], quant["warps"]), (128, 4)):
            cases.append((f"quant_attend, {bits}-bit, {'bf16' if native else 'fp32'} dequantization", tk._attend_quant_kernel,
                          dict(base, BLOCK=b, BITS=bits, QG=32, ALIGNED=True, NATIVE=native, ASM=native,
                               PLANAR=bits in kvstore.PLANAR_BITS, RR=160, SEL=False, NEW=False), w))
    for name, fn, consts, warps in cases:
        try:
            n, ops, skip = loop_sass(fn, SASS_POINTERS, consts, warps, 3)
        except ValueError as e:  # the fp32 4-bit kernel in 4-warp tiles compiles without a loop branch to count
            print(f"| {name} | {consts['BLOCK']} | {warps} | {e} | | | |", flush=True)
            continue
        top = ", ".join(f"{op} {c}" for op, c in ops.most_common(8))
        print(f"| {name} | {consts['BLOCK']} | {warps} | {n} | {skip} | {(n - skip) * warps / consts['BLOCK']:.1f} | "
              f"{top} |", flush=True)
    print("\n| decode_linear, Llama-3-8B's w2 (K 14,336) | block_n x block_k | warps | loop instructions per thread | "
          "thread instructions per weight | top opcodes |\n|---|---|---|---|---|---|")
    for int8 in (False, True):
        t = tk.INT8_TUNE["narrow"] if int8 else tk.LINEAR_TUNE
        consts = dict(K=14336, BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], IEEE=False, INT8=int8)
        pointers = {"X": "*bf16", "W": "*i8" if int8 else "*bf16", "S": "*bf16", "Y": "*bf16"}
        n, ops, _ = loop_sass(tk._linear_kernel, pointers, consts, t["warps"], t["stages"])
        top = ", ".join(f"{op} {c}" for op, c in ops.most_common(8))
        print(f"| {'int8' if int8 else 'bf16'} W | {t['block_n']} x {t['block_k']} | {t['warps']} | {n} | "
              f"{n * t['warps'] * 32 / (t['block_n'] * t['block_k']):.2f} | {top} |", flush=True)


if __name__ == "__main__":
    import json
    if sys.argv[1:] == ["sass"]:
        sys.exit(sass())
    if sys.argv[1:2] == ["compare"] and torch.cuda.is_available():
        sys.exit(compare(sys.argv[2]))
    if not torch.cuda.is_available():
        sys.exit("tune_attend.py times CUDA kernels: it needs a GPU (sass: the kernels' SASS, without one)")
    which = [w for w in sys.argv[1:] if not w.endswith(".json")] or ["others", "dense", "gather", "quant"]
    out = next((w for w in sys.argv[1:] if w.endswith(".json")), None)  # the chosen settings, for bench.py --kernel_tune
    print(torch.cuda.get_device_name(), torch.__version__)
    chosen = {}
    for w in which:
        chosen |= {"dense": tune_dense, "gather": tune_gather, "quant": tune_quant, "others": time_others,
                   "linear": tune_linear, "linear8": lambda: tune_linear(int8=True), "evict": tune_evict,
                   "scores": tune_scores}[w]() or {}
    if out:
        Path(out).write_text(json.dumps(chosen, indent=1))
