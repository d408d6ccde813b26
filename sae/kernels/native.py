"""The compiled half of the TopK fast path: sae/csrc/sparse_kernels.c, built on first use, called with ctypes.

Several loops of a TopK step have no fast torch op on the CPU, the per-token top-k of the [batch, d_sae]
pre-activations first (torch.topk sorts candidates it does not need: 4 ms of a 25 ms step at 1,024 × 4,608
on 2 cores, where this takes about 1 ms); the C file holds them (see its comments), exact and row-parallel.

It is compiled once per machine with the C compiler (`$CC`, else `cc`) into the cache
(`$SAE_CACHE/native/`, default ~/.cache/sae/native/), with -O3 -march=native -fopenmp, into a temporary file
renamed into place (concurrent first runs are safe). Its OpenMP calls resolve to the libgomp that torch has
loaded, so the loops run on torch's threads. Where there is no compiler, the build fails, the tensors are
not contiguous CPU fp32, or SAE_NATIVE=0, `available()` is False and callers use their torch path (the
reference the tests compare against): the results are the same, only slower.

These are internal kernels for sae.kernels and the trainer: the wrappers check dtypes, devices, layouts
and shapes, not index ranges (the callers pass top-k selections, which are in range by construction).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "sparse_kernels.c"
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], ["-O3", "-fopenmp", "-fno-math-errno"])
_LOCK = threading.Lock()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (a cache shared across machines
    with different CPUs keeps one build each)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path | None:
    from sae.files import cache_dir
    source = SOURCE.read_bytes()
    for flags in _FLAG_SETS:
        args = [*flags, "-std=gnu11", "-shared", "-fPIC"]
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(args).encode(),
                                         _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:16]
        target = cache_dir() / "native" / f"sparse_kernels_{key}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(handle)
        try:
            done = subprocess.run([compiler, *args, str(SOURCE), "-o", scratch],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(scratch, target)
                return target
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    return None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built here (or SAE_NATIVE=0)."""
    if os.environ.get("SAE_NATIVE", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    with _LOCK:
        try:
            path = _build(compiler)
            if path is None:
                return None
            lib = ctypes.CDLL(str(path))
        except OSError:
            return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sae_topk_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.sae_topk_rows.restype = i64
    lib.sae_normalize_rows.argtypes = [ptr, i64, i64, ctypes.c_float]
    lib.sae_normalize_rows.restype = None
    lib.sae_weighted_row_sum.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr]
    lib.sae_weighted_row_sum.restype = None
    lib.sae_latent_major.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ptr]
    lib.sae_latent_major.restype = None
    lib.sae_bag_sum.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, ptr]
    lib.sae_bag_sum.restype = None
    lib.sae_decoder_backward.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ptr, ptr]
    lib.sae_decoder_backward.restype = None
    lib.sae_count_above.argtypes = [ptr, i64, i64, ctypes.c_float, ptr]
    lib.sae_count_above.restype = i64
    lib.sae_entries_above.argtypes = [ptr, i64, i64, ctypes.c_float, ptr, ptr, ptr, ptr]
    lib.sae_entries_above.restype = None
    f32 = ctypes.c_float
    lib.sae_adam_step.argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, f32, f32, f32, f32, f32, ctypes.c_int, f32]
    lib.sae_adam_step.restype = None
    return lib


def available() -> bool:
    return library() is not None


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def topk_rows(pre: torch.Tensor, k: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, indices) [n, k] of each row's k largest entries of pre [n, width] (unsorted; the same values
    as torch.topk), through strided-block candidates (blocks divides width, blocks > k). None when the
    kernels are not here or pre is not a contiguous CPU fp32 matrix. Rows with a NaN go to torch.topk."""
    lib = library()
    n, width = pre.shape
    if lib is None or not _plain(pre, torch.float32) or width % blocks or not k < blocks or pre.requires_grad:
        return None
    values = torch.empty(n, k)                            # [n, k]
    indices = torch.empty(n, k, dtype=torch.int64)        # [n, k]
    failed = torch.zeros(n, dtype=torch.uint8)            # [n] rows holding a NaN
    n_failed = lib.sae_topk_rows(pre.data_ptr(), n, width, k, blocks, values.data_ptr(), indices.data_ptr(),
                                 failed.data_ptr())
    if n_failed:
        rows = failed.bool().nonzero().squeeze(1)
        values[rows], indices[rows] = pre[rows].topk(k, dim=1, sorted=False)
    return values, indices


def normalize_rows_(rows: torch.Tensor, eps: float) -> bool:
    """rows [n, d] /= max(‖row‖, eps) in place, one pass; False (nothing done) when the kernels are not
    here or rows is not a contiguous CPU fp32 matrix."""
    lib = library()
    if lib is None or rows.dim() != 2 or not _plain(rows, torch.float32):
        return False
    lib.sae_normalize_rows(rows.data_ptr(), rows.shape[0], rows.shape[1], eps)
    return True


def weighted_row_sum(rows: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
    """scale · Σ_r weights[r] · rows[r] -> [d] (weights @ rows) for rows [n, d], weights [n]: each thread
    sums its share of the rows. None when the kernels are not here or the inputs are not contiguous CPU fp32."""
    lib = library()
    if lib is None or rows.dim() != 2 or not (_plain(rows, torch.float32) and _plain(weights, torch.float32)) \
            or weights.numel() != rows.shape[0]:
        return None
    out = torch.empty(rows.shape[1])                      # [d]
    lib.sae_weighted_row_sum(rows.data_ptr(), weights.data_ptr(), rows.shape[0], rows.shape[1], scale,
                             out.data_ptr())
    return out


def latent_major(dense: torch.Tensor, ids: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                 n_latents: int, rows: torch.Tensor | None = None, per_row: int = 1) -> torch.Tensor | None:
    """[n_latents, d]: row l = Σ weights[e] · dense[row(e)] over the entries e of latent l (ids [n]), taken
    in `order` (entries sorted by latent); row(e) = rows[e], or e // per_row. None when the kernels are not
    here or an input is not contiguous CPU fp32 / int64."""
    lib = library()
    longs = [ids, order] + ([rows] if rows is not None else [])
    if lib is None or dense.dim() != 2 or not (_plain(dense, torch.float32) and _plain(weights, torch.float32)) \
            or not all(_plain(t, torch.int64) for t in longs) or not ids.numel() == order.numel() == weights.numel():
        return None
    out = torch.empty(n_latents, dense.shape[1])          # [n_latents, d]
    lib.sae_latent_major(dense.data_ptr(), dense.shape[1], ids.data_ptr(), order.data_ptr(), weights.data_ptr(),
                         None if rows is None else rows.data_ptr(), max(1, int(per_row)), ids.numel(), n_latents,
                         out.data_ptr())
    return out


def bag_sum(table: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor | None = None,
            per_bag: int = 1) -> torch.Tensor | None:
    """[n_bags, d]: row b = Σ weights[e] · table[ids[e]] over bag b's entries (offsets [n_bags + 1] as CSR
    row pointers, or per_bag entries each): embedding_bag(mode="sum") with per-sample weights. None when the
    kernels are not here or an input is not contiguous CPU fp32 / int64."""
    lib = library()
    if lib is None or table.dim() != 2 or not (_plain(table, torch.float32) and _plain(weights, torch.float32)
                                               and _plain(ids, torch.int64)) or ids.numel() != weights.numel() \
            or (offsets is not None and not _plain(offsets, torch.int64)):
        return None
    n_bags = offsets.numel() - 1 if offsets is not None else ids.numel() // max(1, per_bag)
    out = torch.empty(n_bags, table.shape[1])             # [n_bags, d]
    lib.sae_bag_sum(table.data_ptr(), table.shape[1], ids.data_ptr(), weights.data_ptr(),
                    None if offsets is None else offsets.data_ptr(), max(1, int(per_bag)), n_bags, out.data_ptr())
    return out


def decoder_backward(grad_out: torch.Tensor, W: torch.Tensor, ids: torch.Tensor, order: torch.Tensor,
                     values: torch.Tensor, rows: torch.Tensor | None = None, per_row: int = 1,
                     unit_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sparse decode's backward in one latent-major pass: (sampled [n], grad_W [n_latents, d]) with
    sampled[e] = grad_out[row(e)] · W[ids[e]] and grad_W[l] = Σ values[e] · grad_out[row(e)] over latent l's
    entries, minus (Σ values[e] · sampled[e]) · W[l] when unit_rows. order: the entries sorted by latent;
    row(e) = rows[e], or e // per_row. None when the kernels are not here or an input is not contiguous
    CPU fp32 / int64."""
    lib = library()
    if lib is None or not (_plain(grad_out, torch.float32) and _plain(W, torch.float32) and _plain(values, torch.float32)
                           and _plain(ids, torch.int64) and _plain(order, torch.int64)
                           and (rows is None or _plain(rows, torch.int64))) \
            or grad_out.shape[1] != W.shape[1] or not ids.numel() == order.numel() == values.numel():
        return None
    sampled = torch.empty(ids.numel())                    # [n]
    grad_W = torch.empty_like(W)                          # [n_latents, d]
    lib.sae_decoder_backward(grad_out.data_ptr(), W.data_ptr(), W.shape[1], ids.data_ptr(), order.data_ptr(),
                             values.data_ptr(), None if rows is None else rows.data_ptr(), max(1, int(per_row)),
                             ids.numel(), W.shape[0], int(bool(unit_rows)), sampled.data_ptr(), grad_W.data_ptr())
    return sampled, grad_W


def offsets_above(pre: torch.Tensor, bound: float) -> torch.Tensor | None:
    """[batch + 1] CSR row pointers of the entries of pre [batch, width] greater than bound (offsets[-1]: how
    many; one pass, no temporaries). None when the kernels are not here or pre is not a contiguous CPU fp32
    matrix (or bound is not a finite number)."""
    lib = library()
    if lib is None or pre.dim() != 2 or not _plain(pre, torch.float32) or not math.isfinite(bound):
        return None
    counts = torch.empty(pre.shape[0], dtype=torch.int64)  # [batch]
    lib.sae_count_above(pre.data_ptr(), pre.shape[0], pre.shape[1], bound, counts.data_ptr())
    offsets = torch.zeros(pre.shape[0] + 1, dtype=torch.int64)    # [batch + 1]
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def entries_above(pre: torch.Tensor, bound: float, offsets: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, cols, values) [n] of the entries of pre [batch, width] greater than bound, row by row and in
    column order within a row (so sorted by rows·width + cols). offsets: offsets_above(pre, bound), when the
    caller has it. None where offsets_above would be None."""
    offsets = offsets_above(pre, bound) if offsets is None else offsets
    if offsets is None:
        return None
    batch, width = pre.shape
    total = int(offsets[-1])
    rows, cols = torch.empty(total, dtype=torch.int64), torch.empty(total, dtype=torch.int64)
    values = torch.empty(total)                           # [total]
    library().sae_entries_above(pre.data_ptr(), batch, width, bound, offsets.data_ptr(), rows.data_ptr(),
                                cols.data_ptr(), values.data_ptr())
    return rows, cols, values


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               lr: float, beta1: float, beta2: float, eps: float, step: int, unit_rows: bool = False,
               norm_eps: float = 1e-8) -> bool:
    """One Adam update of param in place (torch.optim.Adam's, no weight decay; step counts from 1), with each
    row of a 2-D param renormalised to unit length in the same pass when unit_rows. False (nothing done)
    when the kernels are not here or a tensor is not contiguous CPU fp32 of param's shape."""
    lib = library()
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if lib is None or not all(_plain(t, torch.float32) and t.shape == param.shape for t in tensors) \
            or (unit_rows and param.dim() != 2):
        return False
    rows, cols = (param.shape[0], param.shape[1]) if param.dim() == 2 else (1, param.numel())
    lib.sae_adam_step(param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), rows, cols,
                      lr, beta1, beta2, eps, 1 - beta1 ** step, math.sqrt(1 - beta2 ** step), int(bool(unit_rows)),
                      norm_eps)
    return True
