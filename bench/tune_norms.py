"""Throwaway tuning run (issue 3 follow-up, H200, 2026-11-28): where the fwd+bwd time of the norm and
RoPE kernels goes, and which kernel variants win. One device call:

    python3 bench/tune_norms.py [sections]      (sections: host,rms,ln,rope,geglu,nf4; default all)

Run 1 (sections host,rms,ln,rope,geglu,nf4) swept variants; run 2 (frms,fln,frope,fgeglu,fnf4,fhost)
times the chosen settings against the committed kernels and the baselines. For each variant it reports
  bench  : median ms of triton.testing.do_bench around fwd / fwd+bwd, exactly as bench/kernel_ops does
           (torch.autograd.grad for the backward; L2 flushed before each call, host work included);
  graph  : the same work captured N times into one CUDA graph and replayed (GPU time only: no host
           launch overhead);
  prof   : per-kernel GPU time from torch.profiler (a few fwd+bwd calls);
  host   : host microseconds per call on a small shape (the GPU idle most of the time).
`old` is the kernel module as committed before this tuning, `new` the working tree. bench/tune_old/ is not
committed; recreate it with
    mkdir -p bench/tune_old && touch bench/tune_old/__init__.py && for f in rms_norm layer_norm rope geglu nf4;
    do git show f19dfd4:fastlm/kernels/$f.py > bench/tune_old/$f.py; done
Run 1's variant knobs (rms_norm PREFETCH/PROGRAMS_PER_SM, layer_norm PROGRAMS_PER_SM, rope
TOKENS_PER_PROGRAM) were removed from the kernels after it; those sections no longer run as written.
Rows go to $OUT/tune.jsonl; a summary table is printed last. Results: bench/results/2026-11-28-tune-run*.jsonl.
"""
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_bandwidth_gbps  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
T0 = time.time()
BUDGET_S = float(os.environ.get("BUDGET_S", "255"))
ROWS = []
_log = open(os.path.join(OUT, "tune.jsonl"), "w")


def rec(section, name, **kw):
    row = dict(section=section, name=name, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()})
    ROWS.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    _log.write(line + "\n")
    _log.flush()


def over_budget(section):
    if time.time() - T0 > BUDGET_S:
        rec(section, "SKIPPED (time budget)")
        return True
    return False


def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=120, return_mode="median")


def graph_ms(fn, n=10):
    """GPU-only ms per call: n calls captured into one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    ms = triton.testing.do_bench(g.replay, warmup=20, rep=150, return_mode="median") / n
    del g
    return ms


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t
    torch.cuda.synchronize()
    return t / n * 1e6


def prof_kernels(fn, n=5):
    """{kernel name (shortened): GPU us per call} over n calls."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in p.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            name = e.name[:60]
            out[name] = out.get(name, 0.0) + e.time_range.elapsed_us() / n
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def safe(section, name, thunk):
    try:
        return thunk()
    except Exception as exc:  # one failing variant must not stop the run
        rec(section, name, error=repr(exc)[:300])
        return None


def measure(section, name, fwd, fwd_bwd, bytes_fwd, bytes_fb, copy_bw, profile_it=False, graph=True):
    row = {}
    if fwd is not None:
        fwd()
        row["fwd_bench"] = bench_ms(fwd)
        if graph:
            row["fwd_graph"] = safe(section, name + " fwd graph", lambda: graph_ms(fwd))
    if fwd_bwd is not None:
        fwd_bwd()
        row["fb_bench"] = bench_ms(fwd_bwd)
        if graph:
            row["fb_graph"] = safe(section, name + " fb graph", lambda: graph_ms(fwd_bwd))
    for k in ("fwd_bench", "fwd_graph"):
        if row.get(k):
            row[k + "_pct"] = round(100 * bytes_fwd / (row[k] * 1e-3) / 1e9 / copy_bw, 1)
    for k in ("fb_bench", "fb_graph"):
        if row.get(k):
            row[k + "_pct"] = round(100 * bytes_fb / (row[k] * 1e-3) / 1e9 / copy_bw, 1)
    if profile_it and fwd_bwd is not None:
        row["prof"] = safe(section, name + " prof", lambda: prof_kernels(fwd_bwd))
    rec(section, name, **row)
    torch.cuda.empty_cache()


def setattrs(mod, **kw):
    old = {k: getattr(mod, k) for k in kw}
    for k, v in kw.items():
        setattr(mod, k, v)
    return old


# ----------------------------------------------------------------------------------------------------------
def sec_host():
    """Host overhead per call on small shapes (256 x 4096 bf16: ~2 MB, GPU time ~ a few us)."""
    from bench.tune_old import rms_norm as old
    from fastlm.kernels import rms_norm as new
    sec = "host"
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    res = {}
    res["torch.empty"] = host_us(lambda: torch.empty(256, 4096, device="cuda", dtype=torch.bfloat16))
    part = torch.randn(396, 4096, device="cuda")
    res["partial.sum(0).to(bf16)"] = host_us(lambda: part.sum(0).to(torch.bfloat16))
    res["grad(x*2) (C++ node)"] = host_us(lambda: torch.autograd.grad(x * 2, (x,), dy))

    class Ident(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g

    res["grad(PyFunction identity)"] = host_us(lambda: torch.autograd.grad(Ident.apply(x), (x,), dy))
    for label, mod in (("old", old), ("new", new)):
        res[f"{label} rms fwd (grad on)"] = host_us(lambda: mod.rms_norm(x, w, 1e-6))
        res[f"{label} rms fwd+bwd"] = host_us(lambda: torch.autograd.grad(mod.rms_norm(x, w, 1e-6), (x, w), dy))
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
        res["liger rms fwd+bwd"] = host_us(lambda: torch.autograd.grad(
            liger_rms_norm(x, w, 1e-6, offset=0.0, casting_mode="llama", in_place=False), (x, w), dy))
    except Exception as exc:
        res["liger"] = repr(exc)[:100]
    comp = torch.compile(lambda a, b: new.reference(a, b, 1e-6))
    res["compile rms fwd+bwd"] = host_us(lambda: torch.autograd.grad(comp(x, w), (x, w), dy))
    res["eager F.layer_norm fwd+bwd"] = host_us(lambda: torch.autograd.grad(
        torch.nn.functional.layer_norm(x, (4096,), w, w), (x, w), dy))
    # bare launches of the new forward kernel
    xd = x.detach()
    y = torch.empty_like(xd)
    rstd = torch.empty(256, device="cuda")
    k = new._rms_norm_fwd_kernel
    args = (xd, w, y, rstd, 256, 4096, 4096, 4096, 1e-6)
    kw = dict(GEMMA=False, ROWS=1, BLOCK=4096, PREFETCH=False)
    compiled = k[(256,)](*args, **kw, num_warps=8)
    res["triton launch jit[grid](...)"] = host_us(lambda: k[(256,)](*args, **kw, num_warps=8))
    try:
        y2 = torch.empty_like(y)
        runner = compiled[(256, 1, 1)]
        runner(xd, w, y2, rstd, 256, 4096, 4096, 4096, 1e-6, False, 1, 4096, False)
        torch.cuda.synchronize()
        res["compiled[grid] output equal"] = bool(torch.equal(y, y2))
        res["triton launch compiled[grid](...)"] = host_us(
            lambda: runner(xd, w, y2, rstd, 256, 4096, 4096, 4096, 1e-6, False, 1, 4096, False))
    except Exception as exc:
        res["compiled[grid]"] = repr(exc)[:200]
    for k_, v in res.items():
        rec(sec, k_, us=v)


# ----------------------------------------------------------------------------------------------------------
def sec_rms(copy_bw):
    from bench.tune_old import rms_norm as old
    from fastlm.kernels import rms_norm as new
    sec = "rms"
    T, H = 16384, 4096
    eps = 1e-6

    def inputs(shape, gemma):
        torch.manual_seed(0)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (0.1 * torch.randn(shape[-1], device="cuda") + (0.0 if gemma else 1.0)).to(torch.bfloat16)
        return x, w.requires_grad_(), torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def fns(f, x, w, dy):
        def fwd():
            with torch.no_grad():
                f(x, w)

        def fb():
            torch.autograd.grad(f(x, w), (x, w), dy)
        return fwd, fb

    try:
        from liger_kernel.transformers.functional import liger_rms_norm
    except Exception:
        liger_rms_norm = None
    cases = [("llama", (T, H), False), ("gemma", (T, H), True), ("qnorm", (T, 32, 128), False)]
    for case, shape, gemma in cases:
        if over_budget(sec):
            return
        x, w, dy = inputs(shape, gemma)
        nbytes = x.numel() * 2
        base = {"old": lambda a, b: old.rms_norm(a, b, eps, gemma)}
        if liger_rms_norm is not None:
            off, mode = (1.0, "gemma") if gemma else (0.0, "llama")
            base["liger"] = lambda a, b: liger_rms_norm(a, b, eps, offset=off, casting_mode=mode, in_place=False)
        if case in ("llama", "gemma"):
            base["compile"] = torch.compile(lambda a, b: new.reference(a, b, eps, gemma))
        for name, f in base.items():
            safe(sec, f"{case} {name}", lambda: measure(sec, f"{case} {name}", *fns(f, x, w, dy), 2 * nbytes,
                                                          5 * nbytes, copy_bw, profile_it=(case == "llama")))
        # variants of the new kernels
        variants = [dict(PERSISTENT=True, PREFETCH=False, ELEMS_PER_WARP=512),
                    dict(PERSISTENT=False, PREFETCH=False, ELEMS_PER_WARP=512),
                    dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=512),
                    dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=256),
                    dict(PERSISTENT=True, PREFETCH=False, ELEMS_PER_WARP=256),
                    dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=1024),
                    dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=512, PROGRAMS_PER_SM=2),
                    dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=512, PROGRAMS_PER_SM=1)]
        if case == "qnorm":
            variants = variants[:4] + [variants[5]] + [dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=512, TILE_ELEMS=8192),
                         dict(PERSISTENT=True, PREFETCH=False, ELEMS_PER_WARP=512, TILE_ELEMS=2048)]
        if case == "gemma":
            variants = variants[:4]
        for v in variants:
            if over_budget(sec):
                return
            saved = setattrs(new, **v)
            try:
                label = f"{case} new " + " ".join(f"{k}={val}" for k, val in v.items())
                safe(sec, label, lambda: measure(sec, label, *fns(lambda a, b: new.rms_norm(a, b, eps, gemma), x, w, dy),
                                                  2 * nbytes, 5 * nbytes, copy_bw,
                                                  profile_it=(case == "llama" and v is variants[2])))
            finally:
                setattrs(new, **saved)
        del x, w, dy
        torch.cuda.empty_cache()


def sec_ln(copy_bw):
    from bench.tune_old import layer_norm as old
    from fastlm.kernels import layer_norm as new
    sec = "ln"
    T, H = 16384, 4096
    torch.manual_seed(0)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16).requires_grad_()
    b = (0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    nbytes = x.numel() * 2

    def fns(f):
        def fwd():
            with torch.no_grad():
                f(x, w, b)

        def fb():
            torch.autograd.grad(f(x, w, b), (x, w, b), dy)
        return fwd, fb

    base = {"old": lambda a, c, d: old.layer_norm(a, c, d, 1e-5), "eager": lambda a, c, d: new.reference(a, c, d, 1e-5)}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm
        base["liger"] = lambda a, c, d: liger_layer_norm(a, c, d, 1e-5)
    except Exception:
        pass
    for name, f in base.items():
        safe(sec, name, lambda: measure(sec, name, *fns(f), 2 * nbytes, 5 * nbytes, copy_bw, profile_it=True))
    variants = [dict(PERSISTENT=True, PREFETCH=False, ELEMS_PER_WARP=512),
                dict(PERSISTENT=False, PREFETCH=False, ELEMS_PER_WARP=512),
                dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=512),
                dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=256),
                dict(PERSISTENT=True, PREFETCH=False, ELEMS_PER_WARP=256),
                dict(PERSISTENT=True, PREFETCH=True, ELEMS_PER_WARP=512, PROGRAMS_PER_SM=2)]
    for v in variants:
        if over_budget(sec):
            return
        saved = setattrs(new, **v)
        try:
            label = "new " + " ".join(f"{k}={val}" for k, val in v.items())
            safe(sec, label, lambda: measure(sec, label, *fns(lambda a, c, d: new.layer_norm(a, c, d, 1e-5)),
                                              2 * nbytes, 5 * nbytes, copy_bw, profile_it=(v is variants[2])))
        finally:
            setattrs(new, **saved)


def sec_rope(copy_bw):
    from bench.tune_old import rope as old
    from fastlm.kernels import rope as new
    sec = "rope"
    B, T, H, HKV, D = 2, 8192, 32, 8, 128
    torch.manual_seed(0)
    dt = torch.bfloat16
    q_base = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    k_base = torch.randn(B, T, HKV, D, device="cuda", dtype=dt)
    dq = torch.randn(B, T, H, D, device="cuda", dtype=dt).transpose(1, 2)
    dk = torch.randn(B, T, HKV, D, device="cuda", dtype=dt).transpose(1, 2)
    pos = torch.arange(T, device="cuda", dtype=torch.float32)[None].expand(B, T)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    qk = (q_base.numel() + k_base.numel()) * 2

    def fns(f):
        qb, kb = q_base.clone(), k_base.clone()
        q, k = qb.transpose(1, 2), kb.transpose(1, 2)
        ql, kl = qb.clone().requires_grad_(), kb.clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                f(q, k, cos, sin)

        def fb():
            qo, ko = f(ql.transpose(1, 2), kl.transpose(1, 2), cos, sin)
            torch.autograd.grad((qo, ko), (ql, kl), (dq, dk))
        return fwd, fb

    base = {"old": old.apply_rope}
    try:
        from liger_kernel.transformers.functional import liger_rope
        base["liger"] = lambda q, k, c, s: liger_rope(q, k, c, s)[:2]
    except Exception:
        pass
    for name, f in base.items():
        safe(sec, name, lambda: measure(sec, name, *fns(f), 2 * qk, 4 * qk, copy_bw, profile_it=True))
    variants = [dict(FUSED=False, TOKENS_PER_PROGRAM=1, ELEMS_PER_THREAD=16),
                dict(FUSED=True, TOKENS_PER_PROGRAM=1, ELEMS_PER_THREAD=16),
                dict(FUSED=True, TOKENS_PER_PROGRAM=1, ELEMS_PER_THREAD=32),
                dict(FUSED=True, TOKENS_PER_PROGRAM=2, ELEMS_PER_THREAD=16),
                dict(FUSED=True, TOKENS_PER_PROGRAM=2, ELEMS_PER_THREAD=32),
                dict(FUSED=True, TOKENS_PER_PROGRAM=4, ELEMS_PER_THREAD=32),
                dict(FUSED=False, TOKENS_PER_PROGRAM=2, ELEMS_PER_THREAD=32)]
    for v in variants:
        if over_budget(sec):
            return
        saved = setattrs(new, **v)
        try:
            label = "new " + " ".join(f"{k}={val}" for k, val in v.items())
            safe(sec, label, lambda: measure(sec, label, *fns(new.apply_rope), 2 * qk, 4 * qk, copy_bw))
        finally:
            setattrs(new, **saved)


def sec_geglu(copy_bw):
    from fastlm.kernels import geglu as new
    sec = "geglu"
    M, N = 16384, 14336
    torch.manual_seed(0)
    gate = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    nbytes = gate.numel() * 2

    def fns(f):
        def fwd():
            with torch.no_grad():
                f(gate, up)

        def fb():
            torch.autograd.grad(f(gate, up), (gate, up), dy)
        return fwd, fb

    comp = torch.compile(lambda g, u: new.reference(g, u, "none"))
    safe(sec, "compile erf", lambda: measure(sec, "compile erf", *fns(comp), 3 * nbytes, 8 * nbytes, copy_bw,
                                             graph=False))
    for v in [dict(NR_ERFC=False, BLOCK=1024, NUM_WARPS=4), dict(NR_ERFC=True, BLOCK=1024, NUM_WARPS=4),
              dict(NR_ERFC=False, BLOCK=2048, NUM_WARPS=8), dict(NR_ERFC=True, BLOCK=2048, NUM_WARPS=8),
              dict(NR_ERFC=False, BLOCK=2048, NUM_WARPS=4), dict(NR_ERFC=True, BLOCK=2048, NUM_WARPS=4)]:
        if over_budget(sec):
            return
        saved = setattrs(new, **v)
        try:
            label = "new erf " + " ".join(f"{k}={val}" for k, val in v.items())
            safe(sec, label, lambda: measure(sec, label, *fns(lambda g, u: new.geglu(g, u, "none", False)),
                                              3 * nbytes, 8 * nbytes, copy_bw, graph=False))
        finally:
            setattrs(new, **saved)


def sec_nf4(copy_bw):
    from fastlm.kernels import nf4 as new
    sec = "nf4"
    N, K = 14336, 4096
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        rec(sec, "no bitsandbytes", error=repr(exc)[:100])
        return
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    for nested in (False, True):
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        absb = qs.absmax.numel() + qs.state2.absmax.numel() * 4 if nested else qs.absmax.numel() * 4
        nbytes = N * K // 2 + absb + 2 * N * K
        ref = bnbf.dequantize_4bit(packed, qs)
        for tile, warps in ((4096, 4), (4096, 8), (8192, 8), (8192, 4), (16384, 8), (2048, 4)):
            if nested and (tile, warps) not in ((4096, 4), (8192, 8), (8192, 4)):
                continue
            saved = setattrs(new, DEQUANT_TILE=tile, DEQUANT_WARPS=warps)
            try:
                fn = lambda: new.dequantize_nf4(packed, qs, out=buf)  # noqa: E731
                fn()
                exact = bool(torch.equal(buf, ref))
                ms = bench_ms(fn)
                gms = safe(sec, "graph", lambda: graph_ms(fn))
                rec(sec, f"{'nested' if nested else 'plain'} tile={tile} warps={warps}", bench=ms, graph=gms,
                    pct=round(100 * nbytes / (ms * 1e-3) / 1e9 / copy_bw, 1), exact=exact)
            finally:
                setattrs(new, **saved)
        comp = torch.compile(new.reference_torch)
        comp(packed, qs)
        rec(sec, f"{'nested' if nested else 'plain'} compile(reference_torch)", bench=bench_ms(lambda: comp(packed, qs)))
        rec(sec, f"{'nested' if nested else 'plain'} bnb", bench=bench_ms(lambda: bnbf.dequantize_4bit(packed, qs)))


# ---------------------------------------------------------------------------------------------------------
# Run 2: the chosen settings (working tree) against the committed kernels (bench/tune_old) and the baselines.
def fin_rms(copy_bw):
    from bench.tune_old import rms_norm as old
    from fastlm.kernels import rms_norm as new
    sec = "F-rms"
    eps = 1e-6
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
    except Exception:
        liger_rms_norm = None
    for case, shape, gemma in [("llama", (16384, 4096), False), ("gemma", (16384, 4096), True),
                               ("qnorm", (16384, 32, 128), False)]:
        if over_budget(sec):
            return
        torch.manual_seed(0)
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (0.1 * torch.randn(shape[-1], device="cuda") + (0.0 if gemma else 1.0)).to(torch.bfloat16)
        w.requires_grad_()
        dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        nbytes = x.numel() * 2
        impls = {"old": lambda a, b: old.rms_norm(a, b, eps, gemma), "new": lambda a, b: new.rms_norm(a, b, eps, gemma)}
        if liger_rms_norm is not None:
            off, mode = (1.0, "gemma") if gemma else (0.0, "llama")
            impls["liger"] = lambda a, b: liger_rms_norm(a, b, eps, offset=off, casting_mode=mode, in_place=False)
        if case != "qnorm":
            impls["compile"] = torch.compile(lambda a, b: new.reference(a, b, eps, gemma))
        for name, f in impls.items():
            def fwd(f=f):
                with torch.no_grad():
                    f(x, w)

            def fb(f=f):
                torch.autograd.grad(f(x, w), (x, w), dy)
            safe(sec, f"{case} {name}", lambda: measure(sec, f"{case} {name}", fwd, fb, 2 * nbytes, 5 * nbytes, copy_bw,
                                                          profile_it=(name == "new" and case == "llama")))
        for epw in (256, 1024):  # forward alone: warps per row for the one-tile-per-program grid
            saved = setattrs(new, ELEMS_PER_WARP=epw)
            try:
                def fwd():
                    with torch.no_grad():
                        new.rms_norm(x, w, eps, gemma)
                fwd()
                rec(sec, f"{case} new fwd ELEMS_PER_WARP={epw}", fwd_graph=safe(sec, "g", lambda: graph_ms(fwd)))
            finally:
                setattrs(new, **saved)
        del x, w, dy
        torch.cuda.empty_cache()


def fin_ln(copy_bw):
    from bench.tune_old import layer_norm as old
    from fastlm.kernels import layer_norm as new
    sec = "F-ln"
    torch.manual_seed(0)
    T, H = 16384, 4096
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16).requires_grad_()
    b = (0.1 * torch.randn(H, device="cuda")).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    nbytes = x.numel() * 2
    impls = {"old": lambda a, c, d: old.layer_norm(a, c, d, 1e-5), "new": lambda a, c, d: new.layer_norm(a, c, d, 1e-5),
             "eager": lambda a, c, d: new.reference(a, c, d, 1e-5)}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm
        impls["liger"] = lambda a, c, d: liger_layer_norm(a, c, d, 1e-5)
    except Exception:
        pass
    impls["compile"] = torch.compile(lambda a, c, d: new.reference(a, c, d, 1e-5))
    for name, f in impls.items():
        if over_budget(sec):
            return

        def fwd(f=f):
            with torch.no_grad():
                f(x, w, b)

        def fb(f=f):
            torch.autograd.grad(f(x, w, b), (x, w, b), dy)
        safe(sec, name, lambda: measure(sec, name, fwd, fb, 2 * nbytes, 5 * nbytes, copy_bw, profile_it=(name == "new")))


def fin_rope(copy_bw):
    from bench.tune_old import rope as old
    from fastlm.kernels import rope as new
    sec = "F-rope"
    B, T, H, HKV, D = 2, 8192, 32, 8, 128
    torch.manual_seed(0)
    dt = torch.bfloat16
    q_base = torch.randn(B, T, H, D, device="cuda", dtype=dt)
    k_base = torch.randn(B, T, HKV, D, device="cuda", dtype=dt)
    dq = torch.randn(B, T, H, D, device="cuda", dtype=dt).transpose(1, 2)
    dk = torch.randn(B, T, HKV, D, device="cuda", dtype=dt).transpose(1, 2)
    pos = torch.arange(T, device="cuda", dtype=torch.float32)[None].expand(B, T)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D)
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    qk = (q_base.numel() + k_base.numel()) * 2
    impls = {"old": old.apply_rope, "new": new.apply_rope, "compile": torch.compile(new.reference)}
    try:
        from liger_kernel.transformers.functional import liger_rope
        impls["liger"] = lambda q, k, c, s: liger_rope(q, k, c, s)[:2]
    except Exception:
        pass
    for name, f in impls.items():
        if over_budget(sec):
            return
        qb, kb = q_base.clone(), k_base.clone()
        q, k = qb.transpose(1, 2), kb.transpose(1, 2)
        ql, kl = qb.clone().requires_grad_(), kb.clone().requires_grad_()

        def fwd(f=f, q=q, k=k):
            with torch.no_grad():
                f(q, k, cos, sin)

        def fb(f=f, ql=ql, kl=kl):
            qo, ko = f(ql.transpose(1, 2), kl.transpose(1, 2), cos, sin)
            torch.autograd.grad((qo, ko), (ql, kl), (dq, dk))
        safe(sec, name, lambda: measure(sec, name, fwd, fb, 2 * qk, 4 * qk, copy_bw))


def fin_geglu(copy_bw):
    from bench.tune_old import geglu as old
    from fastlm.kernels import geglu as new
    sec = "F-geglu"
    M, N = 16384, 14336
    torch.manual_seed(0)
    gate = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    nbytes = gate.numel() * 2
    for approx in ("none", "tanh"):
        impls = {"old": lambda g, u: old.geglu(g, u, approx, False), "new": lambda g, u: new.geglu(g, u, approx, False)}
        if approx == "none":
            impls["compile"] = torch.compile(lambda g, u: new.reference(g, u, "none"))
        for name, f in impls.items():
            if over_budget(sec):
                return

            def fwd(f=f):
                with torch.no_grad():
                    f(gate, up)

            def fb(f=f):
                torch.autograd.grad(f(gate, up), (gate, up), dy)
            row = {"fwd_bench": bench_ms(fwd), "fb_bench": bench_ms(fb)}
            row["fwd_graph"] = safe(sec, "g", lambda: graph_ms(fwd, n=3))
            row["fb_graph"] = safe(sec, "g", lambda: graph_ms(fb, n=3))
            if row["fb_graph"]:
                row["fb_graph_pct"] = round(100 * 8 * nbytes / (row["fb_graph"] * 1e-3) / 1e9 / copy_bw, 1)
            rec(sec, f"{approx} {name}", **row)
            torch.cuda.empty_cache()


def fin_nf4(copy_bw):
    from bench.tune_old import nf4 as old
    from fastlm.kernels import nf4 as new
    sec = "F-nf4"
    N, K = 14336, 4096
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        rec(sec, "no bitsandbytes", error=repr(exc)[:100])
        return
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
    for nested in (False, True):
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        absb = qs.absmax.numel() + qs.state2.absmax.numel() * 4 if nested else qs.absmax.numel() * 4
        nbytes = N * K // 2 + absb + 2 * N * K
        ref = bnbf.dequantize_4bit(packed, qs)
        for name, fn in (("old", lambda: old.dequantize_nf4(packed, qs, out=buf)),
                         ("new", lambda: new.dequantize_nf4(packed, qs, out=buf)),
                         ("bnb", lambda: bnbf.dequantize_4bit(packed, qs))):
            fn()
            exact = bool(torch.equal(buf, ref)) if name != "bnb" else None
            ms = bench_ms(fn)
            gms = safe(sec, name, lambda: graph_ms(fn, n=1))
            rec(sec, f"{'nested' if nested else 'plain'} {name}", bench=ms, graph=gms, exact=exact,
                pct=round(100 * nbytes / (gms * 1e-3) / 1e9 / copy_bw, 1) if gms else None,
                host=host_us(fn, n=50))


def fin_host():
    from bench.tune_old import layer_norm as old_ln
    from bench.tune_old import rms_norm as old
    from fastlm.kernels import layer_norm as new_ln
    from fastlm.kernels import rms_norm as new
    sec = "F-host"
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    fns = {"old rms fwd no-grad": lambda: _nograd(lambda: old.rms_norm(x, w, 1e-6)),
           "new rms fwd no-grad": lambda: _nograd(lambda: new.rms_norm(x, w, 1e-6)),
           "old rms fwd+bwd": lambda: torch.autograd.grad(old.rms_norm(x, w, 1e-6), (x, w), dy),
           "new rms fwd+bwd": lambda: torch.autograd.grad(new.rms_norm(x, w, 1e-6), (x, w), dy),
           "old ln fwd+bwd": lambda: torch.autograd.grad(old_ln.layer_norm(x, w, w, 1e-5), (x, w), dy),
           "new ln fwd+bwd": lambda: torch.autograd.grad(new_ln.layer_norm(x, w, w, 1e-5), (x, w), dy)}
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
        fns["liger rms fwd+bwd"] = lambda: torch.autograd.grad(
            liger_rms_norm(x, w, 1e-6, offset=0.0, casting_mode="llama", in_place=False), (x, w), dy)
    except Exception:
        pass
    res = {k: [] for k in fns}
    for _ in range(3):  # interleaved: the host's speed drifts
        for k, f in fns.items():
            res[k].append(round(host_us(f, n=100), 1))
    for k, v in res.items():
        rec(sec, k, us=min(v), all=v)


def _nograd(f):
    with torch.no_grad():
        return f()


def main():
    sections = sys.argv[1].split(",") if len(sys.argv) > 1 else ["host", "rms", "ln", "rope", "geglu", "nf4"]
    copy_bw = copy_bandwidth_gbps()
    rec("meta", "env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        copy_gbps=round(copy_bw, 1))
    funcs = dict(host=lambda: sec_host(), rms=lambda: sec_rms(copy_bw), ln=lambda: sec_ln(copy_bw),
                 rope=lambda: sec_rope(copy_bw), geglu=lambda: sec_geglu(copy_bw), nf4=lambda: sec_nf4(copy_bw),
                 frms=lambda: fin_rms(copy_bw), fln=lambda: fin_ln(copy_bw), frope=lambda: fin_rope(copy_bw),
                 fgeglu=lambda: fin_geglu(copy_bw), fnf4=lambda: fin_nf4(copy_bw), fhost=lambda: fin_host())
    for s in sections:
        t = time.time()
        safe(s, "SECTION FAILED", funcs[s])
        rec(s, "section seconds", s=round(time.time() - t, 1))
    print("\n=== summary ===")
    for r in ROWS:
        keys = [k for k in ("us", "fwd_bench", "fwd_graph", "fwd_graph_pct", "fb_bench", "fb_graph", "fb_graph_pct",
                            "bench", "graph", "pct", "exact", "host", "error", "s") if k in r]
        print(f"{r['section'][:7]:7} {r['name'][:44]:44} " + " ".join(f"{k}={r[k]}" for k in keys))


if __name__ == "__main__":
    main()
