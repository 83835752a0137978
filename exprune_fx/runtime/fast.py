"""Fast CPU kernels: the reference semantics at a cost proportional to the surviving outputs.

The reference kernels (:mod:`.kernels`) compute a site's first ``k`` terms for every output
with one matmul and the remainder for whole output columns, so on a decode-style call
(a few rows) they do about as much work as the dense layer, plus the test. The fast kernels
(``csrc/fast_kernels.cpp``, compiled with ``torch.utils.cpp_extension`` on first use and
cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) read each output's
first ``k`` terms, test it, and read the rest of its weight row only when it survives.

Which kernels run is a process-wide setting:

* ``"auto"`` (default): on every supported linear call (float32 CPU tensors, a weight split
  at compile time), the row-wise kernel or the BLAS kernel, as :func:`choose` says; on
  convolution sites, :func:`relu_conv2d` (the C++ head and test around torch's remainder
  convolution); the reference kernels elsewhere, and everywhere when the extension cannot be
  built (no C++ compiler), with one warning;
* ``"fast"``: the row-wise kernel on every supported linear call, whatever the cost;
  convolution sites as under ``"auto"``;
* ``"fastest"``: per call, the row-wise kernel where it beats the dense layer, else the dense
  layer itself (that call prunes nothing); convolution and argmax sites run dense;
* ``"reference"``: the reference kernels only (the count-only simulation).

Set it with :func:`use` (also a context manager) or the ``EXPRUNE_KERNELS`` environment
variable. Outputs and counters are the same under every setting but ``"fastest"``, except
``computed`` (the MACs the kernel actually spent) and float rounding.

Example:
    >>> import torch
    >>> from exprune_fx.runtime import fast
    >>> with fast.use("reference"):
    ...     fast.current()
    'reference'
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from .derived import built_once
from .setting import set_scoped

SETTINGS = ("auto", "fast", "fastest", "reference")
# one translation unit, in this order: the linear kernels and shared helpers, the convolution
# kernels, the Python bindings
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("fast_kernels.cpp", "conv_kernels.cpp", "bindings.cpp")]
_state = {"setting": os.environ.get("EXPRUNE_KERNELS", "auto"), "module": None, "failed": None}
_lock = threading.Lock()

# The cost model's constants (``exprune-fx tune`` refits them on another machine: runtime/tuning.py),
# fitted to the grid of ``python benchmarks/site_kernels.py --runs 5``
# (seven layer shapes from 512 x 128 to 1024 x 1024 and 256 x 3136, 1-32 rows, 10-100%
# survivors; docs/benchmarks.md, "The cost model's data") as the values that lose the least time
# against always taking the faster kernel, over two runs of the grid on the development machine
# (AMD EPYC, 2 shared cores, torch 2.13 CPU). The optimum is flat: the best ten candidates lose
# 5.3-5.4% on average; never running row-wise loses 57-69%.
#
# "auto": the row-wise kernel when rows x (k-share + (1 - k-share) x survivor share), its weight
# rows read, is at most ROW_BUDGET, else the BLAS kernel (which reuses a weight row across rows).
ROW_BUDGET = 8.0
# "fastest": the row-wise kernel when its reads plus a fixed cost per output (its test and
# bookkeeping) of OUTPUT_COST weight elements are at most DENSE_BUDGET dense-layer reads, and
# the rows are at least MIN_TERMS terms long; else the dense layer. The budget is well above 1:
# BLAS is least efficient on a few rows (its one-row product of a 1024 x 1024 layer takes about
# twice the row-wise kernel's time with nothing pruned). Short rows lose almost everywhere: the
# 512 x 128 and 512 x 256 layers run 1.2-2x slower row-wise at one row unless few outputs survive.
DENSE_BUDGET = 10.0
OUTPUT_COST = 384.0
MIN_TERMS = 384


def use(setting: str):
    """Set the kernels for the whole process; as a context manager, restore the old setting on exit."""
    return set_scoped(_state, setting, SETTINGS, "kernels")


def current() -> str:
    """The kernel setting in force, one of :data:`SETTINGS`."""
    setting = _state["setting"]
    if setting not in SETTINGS:
        raise InputError(f"EXPRUNE_KERNELS must be one of {SETTINGS} (got {setting!r})")
    return setting


def module():
    """The compiled extension, built on first call; None when it cannot be built."""
    if _state["module"] is not None or _state["failed"] is not None:
        return _state["module"]
    with _lock:
        if _state["module"] is None and _state["failed"] is None:
            try:
                _state["module"] = _build()
            except Exception as exc:  # no compiler, no ninja, ...: fall back, say why once
                _state["failed"] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                warnings.warn(f"exprune-fx: the fast kernels could not be built ({_state['failed']}); "
                              "using the reference kernels", RuntimeWarning, stacklevel=3)
            else:
                from . import tuning  # the constants `exprune-fx tune` saved for this machine, if any

                tuning.apply_saved()
    return _state["module"]


def built() -> bool:
    """Whether the extension has been built in this process (:func:`module` builds it)."""
    return _state["module"] is not None


def _build():
    from torch.utils import cpp_extension

    source = "\n".join(path.read_text() for path in _SOURCES)
    # -march=native: the build is per machine; the CPU's flags are in the name so that a shared
    # cache never hands one machine's build to another.
    flags = _cpu_flags()
    # -fopenmp: at::parallel_for is inline OpenMP code; the extension shares torch's
    # libgomp.so.1 (already loaded), so there is one thread pool. -fno-math-errno: no kernel
    # reads errno, and without it a loop of square roots does not vectorize.
    cflags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
    tag = hashlib.sha1((source + torch.__version__ + platform.machine() + flags + " ".join(cflags)).encode())
    return cpp_extension.load_inline(f"exprune_fast_{tag.hexdigest()[:12]}", cpp_sources=[source], verbose=False,
                                     extra_cflags=cflags, extra_ldflags=["-fopenmp"])


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


ROW, BLAS, DENSE = "row-wise", "blas", "dense"
_KERNELS = (ROW, BLAS, DENSE)  # their codes in csrc/fast_kernels.cpp are their positions here
_SETTING_CODES = {"auto": 0, "fast": 1, "fastest": 2}


def choose(rows: int, k_share: float, stats: torch.Tensor, terms: int = 1 << 30,
           constants: dict | None = None) -> str | None:
    """The cost model: the kernel for one call of a linear site. Its expected work in weight
    rows read is ``reads = rows * (k_share + (1 - k_share) * survivors)``, ``survivors`` the
    site's measured share of outputs kept so far among those it tested (counters: ``1 - pruned
    / (outputs - untested)``; 1 before its first tested call; calls run dense are no evidence),
    ``terms`` the contraction length K:

    * ``"fast"``: always the row-wise kernel;
    * ``"auto"``: row-wise when ``reads <= ROW_BUDGET``, else the BLAS kernel (the same
      decisions, as many rows as BLAS likes);
    * ``"fastest"``: row-wise when ``reads + rows * OUTPUT_COST / terms <= DENSE_BUDGET`` and
      ``terms >= MIN_TERMS`` (where it beats the dense layer), else the dense layer itself (this
      call prunes nothing).

    It runs in C++ (``choose`` in csrc/fast_kernels.cpp), inside the same call as the kernel;
    this function asks it, for tests and tools, with the constants in force or (``constants``,
    by name) others. Needs the extension (None without it).
    """
    ext = module()
    if ext is None:
        return None
    c = {"ROW_BUDGET": ROW_BUDGET, "DENSE_BUDGET": DENSE_BUDGET, "OUTPUT_COST": OUTPUT_COST, "MIN_TERMS": MIN_TERMS,
         **(constants or {})}
    return _KERNELS[ext.choose(rows, k_share, stats, terms, _SETTING_CODES.get(current(), 0), c["ROW_BUDGET"],
                               c["DENSE_BUDGET"], c["OUTPUT_COST"], c["MIN_TERMS"])]


def relu_linear(x, weight, scale, offset, unit: int, k: int, test: int, critical, stats, stages: int = 1,
                kernel: str | None = None):
    """One call of a linear site (:func:`kernels.relu_linear`'s arguments) on the fast kernels:
    the kernel :func:`choose` picks, or ``kernel`` (:data:`ROW`, :data:`BLAS` for many rows,
    :data:`DENSE` for the dense layer, nothing pruned). The checks, the flattening, the cost
    model and the kernel run in one C++ call: a Python step costs a few microseconds, as much as
    a batch-1 call can save. None where no fast kernel covers the call: the ``"reference"``
    setting (unless ``kernel`` is given), the extension not built, tensors other than float32
    on the CPU, a weight whose columns are not contiguous, or the BLAS kernel with several
    stages. The caller then runs the reference kernel."""
    setting = current()
    if kernel is None and setting == "reference" or x.device.type != "cpu":  # (no build for a CUDA run)
        return None
    ext = module()
    if ext is None:
        return None
    if not isinstance(critical, torch.Tensor):
        critical = torch.tensor(float(critical))
    head_t = None
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2:
        head_t = built_once((weight,), lambda: _head_transposed(weight, k * unit), ("linear head", k * unit))
    return ext.linear_site(x, weight, head_t, scale, offset, unit, k, test, critical, stats, stages,
                           _SETTING_CODES.get(setting, 0), -1 if kernel is None else _KERNELS.index(kernel),
                           ROW_BUDGET, DENSE_BUDGET, OUTPUT_COST, MIN_TERMS)


def _head_transposed(weight, kh: int) -> torch.Tensor:
    """A linear site's head (the weight's first ``kh`` columns) transposed, ``[kh, N]`` padded
    with zero columns to a multiple of 16: the kernels read it 16 outputs at a time."""
    n = weight.shape[0]
    head_t = weight.new_zeros(kh, -(-n // 16) * 16)
    head_t[:, :n] = weight[:, :kh].t()
    return head_t


_BLOCK = 32  # output channels per task in csrc/conv_kernels.cpp (2 x kLanes)
# Channels that torch's CPU convolution (oneDNN, AVX-512) works on at once: a convolution on 24
# of 32 input channels costs about as much as on all 32, plus the copy of the slice.
_CHANNEL_BLOCK = 16
# The largest input (elements) that torch convolves at batch 1 by its own im2col path rather than
# oneDNN (aten/src/ATen/native/Convolution.cpp, use_mkldnn)
_NATIVE_CONV_ELEMENTS = 20480


def _covers_conv(x, weight, padding) -> bool:
    return (current() != "reference" and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not isinstance(padding, str) and module() is not None)


def _transposed_weight(wk) -> torch.Tensor:
    """The C++ convolution kernel's weight for some of a site's terms: wk [G, C, kc, kh, kw] ->
    [G, kc*kh*kw, Cp], transposed (output channels contiguous) and zero-padded to Cp, a multiple
    of 32."""
    g, cout_g, kc, kh, kw = wk.shape
    wt = wk.new_zeros(g, kc * kh * kw, -(-cout_g // _BLOCK) * _BLOCK)
    wt[:, :, :cout_g] = wk.reshape(g, cout_g, kc * kh * kw).transpose(1, 2)
    return wt


def _conv_head_args(xk, wk, k: int, unit: int, stride, padding, dilation, wt=None, padded=None) -> tuple:
    """The C++ head's arguments for a site's first ``k`` terms: xk [B, G, k*unit, H, W], wk
    [G, C, k*unit, kh, kw] -> the input zero-padded (``padded``, where the caller has it
    already), the weight as :func:`_transposed_weight` lays it out (``wt``, likewise), and the
    shape arguments."""
    b, g, kc, h, w = xk.shape
    cout_g, kh, kw = wk.shape[1], wk.shape[3], wk.shape[4]
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if padded is None:
        padded = torch.nn.functional.pad(xk.reshape(b, g * kc, h, w), (pw, pw, ph, ph)).contiguous()
    return (padded, _transposed_weight(wk) if wt is None else wt, cout_g, k, unit, kh, kw, oh, ow, [sh, sw],
            [dh, dw])


def _fills_blocks(channels: int, total: int) -> bool:
    """Whether ``channels``, rounded up to :data:`_CHANNEL_BLOCK`, are all ``total`` of them."""
    return -(-channels // _CHANNEL_BLOCK) * _CHANNEL_BLOCK >= total


def _whole_input_remainder(cin_g: int, kc: int, groups: int) -> bool:
    """Whether a site's remainder convolution reads the whole input, its weight's first ``kc``
    channels zeroed, rather than a copy of the other channels: where those, rounded up to
    :data:`_CHANNEL_BLOCK`, are all of them anyway (no more multiply-adds, no copy). Measured
    at batch 32 (docs/benchmarks.md): the last 24 of 32 channels x1.20 the whole convolution's
    time, the whole input with zeros x0.99; the last 48 of 64 channels x0.79, the whole x1.01."""
    return groups == 1 and _fills_blocks(cin_g - kc, cin_g)


def _direct_remainder(batch: int, groups: int, rest_elements: int, kh: int, kw: int) -> bool:
    """Whether a site's remainder convolution runs on the C++ kernel (the head's, summing
    without a test) rather than torch's: where torch would run it by its own im2col
    convolution, which it keeps for one small image (one group, a kernel no larger than 3 on a
    side, at most :data:`_NATIVE_CONV_ELEMENTS` input elements: ``use_mkldnn`` in torch's
    Convolution.cpp), and which the C++ kernel beats: measured at batch 1 on 16-256 channels,
    x0.52-0.67 the whole convolution's time where torch's convolution of the same channels
    took x0.64-1.13 (docs/benchmarks.md). Above that size torch's oneDNN convolution is the
    faster one (x0.78-0.84 against x1.06-1.52)."""
    return batch == 1 and groups == 1 and not (kh > 3 and kw > 3) and rest_elements <= _NATIVE_CONV_ELEMENTS


def _rest_weight(weight, kc: int, whole_input: bool) -> torch.Tensor:
    """The remainder convolution's weight (groups of one channel range, as ``weight``): the
    last ``cin_g - kc`` input channels of each group, or (``whole_input``) all of them with the
    first ``kc`` zeroed."""
    if whole_input:
        rest = weight.clone()
        rest[:, :kc] = 0
        return rest
    return weight[:, kc:].contiguous()


def conv_term_sums(xk, wk, k: int, unit: int, test: int, stride, padding, dilation):
    """:func:`kernels._conv_term_sums` (the first ``k`` terms' sum and, for the stats test, sum
    of squares per output of a convolution site) in one C++ pass over the input, instead of one
    small convolution per term. None where it does not cover the call: the ``"reference"``
    setting, the extension not built, tensors other than float32 on the CPU, a padding given
    by name."""
    if not _covers_conv(xk, wk, padding):
        return None
    args = _conv_head_args(xk, wk, k, unit, stride, padding, dilation)
    s1, s2 = module().conv_term_sums(*args, test == 0)
    return s1, (s2 if test == 0 else None)


def relu_conv2d(x, weight, scale, offset, stride, padding, dilation, groups: int, unit: int, k: int, test: int,
                critical, stats, stages: int = 1):
    """One call of a convolution site (:func:`kernels.relu_conv2d`'s arguments) with a single
    stage, in three steps: the head's sums and test in one C++ pass (no tensor of squares is
    written), the remainder convolution for the channels with any surviving output (torch's, or
    the C++ kernel's where :func:`_direct_remainder` says), and one C++ pass for the epilogue
    and the counters. None where it does not cover the call
    (:func:`conv_term_sums`'s cases, several stages, counters not on the CPU): the caller runs
    the reference kernel."""
    if stages != 1 or not _covers_conv(x, weight, padding) or stats.device.type != "cpu":
        return None
    if not 2 <= k < weight.shape[1] // unit:  # (the reference's checks and errors)
        return None
    ext = module()
    b, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    g, cout_g, kc = groups, cout // groups, k * unit
    xg, wg = x.view(b, g, cin_g, h, w), weight.view(g, cout_g, cin_g, kh, kw)
    wt = built_once((weight,), lambda: _transposed_weight(wg[:, :, :kc]), ("conv head", g, kc))
    direct = _direct_remainder(b, g, (cin_g - kc) * h * w, kh, kw)
    # direct: the whole input padded once; the head reads its first kc channels, the remainder
    # the others (at batch 1 a channel range of it is contiguous)
    x_pad = torch.nn.functional.pad(x, (padding[1],) * 2 + (padding[0],) * 2).contiguous() if direct else None
    args = _conv_head_args(xg[:, :, :kc], wg[:, :, :kc], k, unit, stride, padding, dilation, wt,
                           None if x_pad is None else x_pad[:, :kc])
    oh, ow = args[7], args[8]
    a = scale.to(torch.float32).reshape(-1).contiguous()
    c = None if offset is None else offset.to(torch.float32).expand(b, cout, oh, ow)
    crit = torch.as_tensor(critical, dtype=torch.float32).reshape(-1).contiguous()
    s1, _, pruned, alive = ext.conv_head(*args, test, a, c, crit, cin_g // unit)
    chans = alive.nonzero().squeeze(1)
    per_map = b * oh * ow * kh * kw  # MACs per output channel and input channel
    z = slot = None
    rest = 0
    # every channel where skipping some would not pay: grouped (a subset would break the
    # groups' layout), or a subset that rounds up to every channel at the convolution's blocks
    every = g > 1 or _fills_blocks(chans.numel(), cout)
    if chans.numel() and every and direct:
        w_rest = built_once((weight,), lambda: _transposed_weight(wg[:, :, kc:]), ("conv rest, transposed", kc))
        z = ext.conv_term_sums(x_pad[:, kc:], w_rest, cout, cin_g // unit - k, unit, kh, kw, oh, ow, args[9], args[10],
                               False)[0]
        rest = cout * (cin_g - kc) * per_map
    elif chans.numel() and every:
        whole = _whole_input_remainder(cin_g, kc, g)
        w_rest = built_once((weight,), lambda: _rest_weight(weight, kc, whole), ("conv rest", kc, whole))
        x_rest = x if whole else xg[:, :, kc:].reshape(b, g * (cin_g - kc), h, w)
        z = torch.nn.functional.conv2d(x_rest, w_rest, None, stride, padding, dilation,
                                       g).contiguous()  # (channels-last in: channels-last out)
        rest = cout * (cin_g if whole else cin_g - kc) * per_map
    elif chans.numel():
        z = torch.nn.functional.conv2d(x[:, kc:], weight[chans, kc:], None, stride, padding, dilation,
                                       1).contiguous()
        slot = torch.full((cout,), -1, dtype=torch.int64)
        slot[chans] = torch.arange(chans.numel())
        rest = chans.numel() * (cin_g - kc) * per_map
    return ext.conv_finish(z, s1, pruned, slot, a, c, stats, oh, ow, k, unit * kh * kw, cin_g * kh * kw, test,
                           float(cout * kc * per_map + rest))
