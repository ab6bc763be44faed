"""soflow_fast._C EMA kernels and the EMA class, on CPU.

The kernels are judged against a float64 evaluation of ``decay * ema + (1 - decay) * param`` with
rounding bounds derived from the formula, so a wrong decay, a skipped element or a dropped tail
fails by orders of magnitude. The FSDP2 case lives in test_ema_fsdp.py.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from soflow_fast import ema as ema_mod
from soflow_fast.ema import EMA, copy_, ema_update_, ema_update_multi_
from tests.utils import raises_naming

_C = ema_mod._C
_NO_EXT_REASON = f"soflow_fast._C not built ({ema_mod._C_IMPORT_ERROR})"
if _C is None and os.environ.get("CI") and not os.environ.get("SOFLOW_NO_EXT"):
    raise RuntimeError(f"CI builds the extension, but {_NO_EXT_REASON}")  # a broken build must not pass as skips
requires_ext = pytest.mark.skipif(_C is None, reason=_NO_EXT_REASON)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ISAS = ["default", "avx2"]
SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 4097, 32769, 100_003]
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per CPU kernel copy (baseline ISA and AVX2+FMA)."""
    if _C is None:
        pytest.skip(_NO_EXT_REASON)
    if request.param == "avx2" and "avx2" not in (_C.cpu_isa(), _default_isa):
        pytest.skip("this CPU or build has no AVX2+FMA kernels")
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(_default_isa)


_default_isa = _C.cpu_isa() if _C is not None else "default"


def make_lists(sizes, param_dtypes, ema_dtype=torch.float32, seed=0):
    """EMA buffers and parameters with values of mixed magnitude (to exercise relative rounding)."""
    g = torch.Generator().manual_seed(seed)
    params, emas = [], []
    for i, n in enumerate(sizes):
        scale = 10.0 ** (i % 5 - 2)
        params.append((torch.randn(n, generator=g) * scale).to(param_dtypes[i % len(param_dtypes)]))
        emas.append((torch.randn(n, generator=g) * scale).to(ema_dtype))
    return emas, params


def reference(ema, param, decay):
    """(exact value in float64, magnitude of the terms) of decay * ema + (1 - decay) * param."""
    e, p = ema.double(), param.double()
    return decay * e + (1.0 - decay) * p, decay * e.abs() + (1.0 - decay) * p.abs()


def check_update(out, ema_before, param, decay, mode):
    """Elementwise rounding bounds: fp32 math ~3 eps of the terms; fp64 math one fp32 rounding."""
    exact, terms = reference(ema_before, param, decay)
    err = (out.double() - exact).abs()
    if mode == "fp32":
        bound = 3 * EPS32 * terms
    elif mode == "fp64_math":
        bound = 0.501 * EPS32 * exact.abs() + 1e-300  # one rounding of a (nearly) exact result to fp32
    else:  # fp64 storage
        bound = 4 * EPS64 * terms
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())}/{out.numel()} elements off (mode={mode}); worst err {err.max().item():.3e} at "
        f"{int(err.argmax())}, bound there {bound.flatten()[int(err.argmax())].item():.3e}"
    )


MODES = {"fp32": (torch.float32, False), "fp64_math": (torch.float32, True), "fp64_storage": (torch.float64, False)}


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_matches_reference(isa, mode, param_dtype):
    ema_dtype, fp64 = MODES[mode]
    emas, params = make_lists(SIZES, [param_dtype], ema_dtype)
    before = [e.clone() for e in emas]
    _C.ema_update_(emas, params, 0.999, fp64)
    for out, e0, p in zip(emas, before, params, strict=True):
        check_update(out, e0, p, 0.999, mode)
        assert out.dtype == ema_dtype


def test_mixed_sizes_and_dtypes_one_call(isa):
    # 1 element to 10M in one list, fp32 and bf16 parameters interleaved: the threads split the flat
    # element range across tensor boundaries, so every boundary case shows up here.
    sizes = [1, 10_000_000, 5, 65536, 3, 1_000_003, 2, 777]
    emas, params = make_lists(sizes, [torch.float32, torch.bfloat16])
    before = [e.clone() for e in emas]
    _C.ema_update_(emas, params, 0.9, False)
    for out, e0, p in zip(emas, before, params, strict=True):
        check_update(out, e0, p, 0.9, "fp32")


@pytest.mark.parametrize("decay", [0.0, 1.0, 0.5, 0.9999])
def test_decay_edges(isa, decay):
    emas, params = make_lists([1025], [torch.float32])
    before = emas[0].clone()
    _C.ema_update_(emas, params, decay, False)
    if decay == 0.0:
        assert torch.equal(emas[0], params[0])
    elif decay == 1.0:
        assert torch.equal(emas[0], before)
    else:
        check_update(emas[0], before, params[0], decay, "fp32")


@pytest.mark.parametrize("mode", list(MODES))
def test_multi_decay_equals_single_calls(isa, mode):
    ema_dtype, fp64 = MODES[mode]
    decays = [0.9999, 0.999, 0.9]
    emas, params = make_lists(SIZES + [300_001], [torch.float32, torch.bfloat16], ema_dtype)
    per_decay = [[e.clone() for e in emas] for _ in decays]
    singles = [[e.clone() for e in emas] for _ in decays]
    _C.ema_update_multi_(per_decay, params, decays, fp64)
    for k, d in enumerate(decays):
        _C.ema_update_(singles[k], params, d, fp64)
        for i, (fused, single) in enumerate(zip(per_decay[k], singles[k], strict=True)):
            # same arithmetic per element, so the fused pass must agree bit for bit
            assert torch.equal(fused, single), f"decay {d}, tensor {i}: fused differs from single-decay call"
            check_update(fused, emas[i], params[i], d, mode)


def test_fp64_math_rounds_correctly(isa):
    # fp64 math leaves one rounding, so nearly every element is the correctly rounded fp32 value;
    # fp32 math misses it for a sizeable fraction. Both figures must show, or the switch does nothing.
    emas, params = make_lists([1_000_000], [torch.float32])
    a, b = emas[0].clone(), emas[0].clone()
    _C.ema_update_([a], params, 0.9999, False)
    _C.ema_update_([b], params, 0.9999, True)
    rounded = reference(emas[0], params[0], 0.9999)[0].float()
    miss32 = (a != rounded).double().mean().item()
    miss64 = (b != rounded).double().mean().item()
    assert miss64 < 1e-4 and miss32 > 0.05, (miss64, miss32)


@requires_ext
def test_empty_lists_and_empty_tensors():
    _C.ema_update_([], [], 0.9, False)
    _C.ema_update_multi_([[], []], [], [0.9, 0.99], False)
    _C.copy_([], [])
    emas, params = (
        [torch.empty(0), torch.ones(3), torch.empty(0, 4)],
        [torch.empty(0), torch.zeros(3), torch.empty(0, 4)],
    )
    _C.ema_update_(emas, params, 0.5, False)
    assert torch.equal(emas[1], torch.full((3,), 0.5))


@requires_ext
def test_multidimensional_shapes():
    e, p = torch.randn(7, 9, 3), torch.randn(7, 9, 3).bfloat16()
    e0 = e.clone()
    _C.ema_update_([e], [p], 0.95, False)
    check_update(e, e0, p, 0.95, "fp32")


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float64])
def test_copy(dtype):
    sizes = [1, 3, 17, 70_001, 1 << 20]
    src = [(torch.randn(n) * 100).to(dtype) for n in sizes]
    dst = [torch.zeros(n, dtype=dtype) for n in sizes]
    _C.copy_(dst, src)
    for d, s in zip(dst, src, strict=True):
        assert torch.equal(d, s)


# ------------------------------------------------------------------------------------------- errors


class _Wrapper(torch.Tensor):
    """Minimal wrapper subclass standing in for a DTensor (no storage of its own)."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device)

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.elem if isinstance(t, _Wrapper) else t
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


_z = torch.zeros
_F16, _BF16, _F64 = torch.float16, torch.bfloat16, torch.float64
# id: (emas, params, decay, exception, message pattern)
_BAD_CALLS = {
    "length": ([_z(3)], [_z(3), _z(3)], 0.9, ValueError, r"got 1 tensors in emas and 2 in params"),
    "shape": ([_z(3)], [_z(4)], 0.9, ValueError, r"emas\[0\] has shape \[3\] but params\[0\] has shape \[4\]"),
    "param-layout": ([_z(2, 3)], [_z(3, 2).t()], 0.9, ValueError, r"params\[0\] is not contiguous"),
    "ema-layout": ([_z(3, 2).t()], [_z(2, 3)], 0.9, ValueError, r"emas\[0\] is not contiguous"),
    "param-dtype": (
        [_z(3)],
        [_z(3, dtype=_F16)],
        0.9,
        TypeError,
        r"params\[0\] has dtype torch.float16; parameters must",
    ),
    "ema-dtype": (
        [_z(3, dtype=_BF16)],
        [_z(3)],
        0.9,
        TypeError,
        r"emas\[0\] has dtype torch.bfloat16; EMA buffers must",
    ),
    "mixed-ema-dtype": (
        [_z(3), _z(2, dtype=_F64)],
        [_z(3), _z(2)],
        0.9,
        TypeError,
        r"emas\[1\] has dtype torch.float64 but emas\[0\]",
    ),
    "device": ([_z(3, device="meta")], [_z(3, device="meta")], 0.9, TypeError, r"params\[0\] is on meta; only cpu"),
    "decay-range": ([_z(3)], [_z(3)], 1.5, ValueError, r"decay must be a finite number in \[0, 1\], got 1.5"),
    "decay-nan": ([_z(3)], [_z(3)], float("nan"), ValueError, r"decay must be a finite number"),
    "subclass": ([_z(3)], [_Wrapper(_z(3))], 0.9, TypeError, r"params\[0\] is a tensor subclass.*to_local"),
}


@requires_ext
@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_argument_errors(case):
    emas, params, decay, exc, pattern = _BAD_CALLS[case]
    with pytest.raises(exc, match=pattern):
        _C.ema_update_(emas, params, decay, False)


@requires_ext
def test_argument_errors_multi_and_copy():
    e, p = torch.zeros(3), torch.zeros(3)
    with raises_naming(ValueError, "2 EMA lists", "1 decays"):
        _C.ema_update_multi_([[e], [e.clone()]], [p], [0.9], False)
    with raises_naming(ValueError, "decays", "empty"):
        _C.ema_update_multi_([], [p], [], False)
    with raises_naming(ValueError, "9 decay rates", "8"):
        _C.ema_update_multi_([[e.clone()] for _ in range(9)], [p], [0.9] * 9, False)
    with raises_naming(ValueError, "emas_per_decay[1][0]", "[4]", "params[0]", "[3]"):
        _C.ema_update_multi_([[e], [torch.zeros(4)]], [p], [0.9, 0.99], False)
    with raises_naming(TypeError, "dst[0]", "torch.float64", "src[0]", "torch.float32"):
        _C.copy_([torch.zeros(3, dtype=torch.float64)], [p])
    with raises_naming(ValueError, "1 destination", "2 source"):
        _C.copy_([e], [p, p])
    assert torch.equal(e, torch.zeros(3))  # a rejected call touches nothing


@requires_ext
def test_isa_switch_rejects_unknown():
    with raises_naming(ValueError, "'sse9'"):
        _C.set_cpu_isa("sse9")


@requires_ext
@requires_cuda
def test_cuda_matches_cpu():
    emas, params = make_lists(SIZES + [1 << 22], [torch.float32, torch.bfloat16])
    if not _C.cuda_built():
        with pytest.raises(RuntimeError, match="built without its CUDA part"):
            _C.ema_update_([e.cuda() for e in emas], [p.cuda() for p in params], 0.99, False)
        return
    for mode, (ema_dtype, fp64) in MODES.items():
        for decays in ([0.99], [0.9999, 0.99]):
            gpu = [[e.to("cuda", ema_dtype) for e in emas] for _ in decays]
            _C.ema_update_multi_(gpu, [p.cuda() for p in params], decays, fp64)
            for k, d in enumerate(decays):
                for out, e0, p in zip(gpu[k], emas, params, strict=True):
                    check_update(out.cpu(), e0.to(ema_dtype), p, d, "fp32" if mode == "fp32" else mode)
    dst = [torch.zeros_like(p).cuda() for p in params]
    _C.copy_(dst, [p.cuda() for p in params])
    assert all(torch.equal(d.cpu(), p) for d, p in zip(dst, params, strict=True))


# ------------------------------------------------------------------------------------------- EMA class


class _Net(nn.Module):
    """fp32 and bf16 parameters of odd sizes, a tied weight, persistent and non-persistent buffers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 5).to(torch.bfloat16)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 7, bias=False)
        self.tail = nn.Linear(7, 5, bias=False)
        self.tail.weight = self.b.weight  # tied: must be averaged once, not twice
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("stats", torch.zeros(9))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)


def _perturb(model, step):
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        model.count.add_(1)
        model.stats.copy_(torch.randn(9, generator=g))


def _loop_reference(model, decays, steps, fp64=False):
    """The authors' per-parameter loop, in float64, as ground truth for the class."""
    shadows = [{n: p.detach().double().clone() for n, p in model.named_parameters()} for _ in decays]
    for step in range(steps):
        _perturb(model, step)
        for shadow, d in zip(shadows, decays, strict=True):
            for n, p in model.named_parameters():
                shadow[n].mul_(d).add_(p.detach().double(), alpha=1 - d)
    return shadows


@pytest.mark.parametrize("use_extension", [True, False], ids=["ext", "fallback"])
@pytest.mark.parametrize("decays", [(0.9,), (0.99, 0.9)], ids=["one-decay", "two-decays"])
def test_ema_class_tracks_loop_reference(use_extension, decays):
    if use_extension and _C is None:
        pytest.skip(_NO_EXT_REASON)
    torch.manual_seed(0)
    model = _Net()
    ref_model = _Net()
    ref_model.load_state_dict(model.state_dict())
    ema = EMA(model, decays=decays, use_extension=use_extension)
    names = [n for n, _ in model.named_parameters()]
    assert list(ema.shadow()) == names  # tied weight listed once
    for step in range(6):
        _perturb(model, step)
        ema.update(model)
    expected = _loop_reference(ref_model, decays, 6)
    for k, d in enumerate(decays):
        for n, t in ema.shadow(d).items():
            assert t.dtype == torch.float32
            moved = (expected[k][n] - ref_model.state_dict()[n].double()).abs().max()
            assert moved > 1e-2, f"{n}: EMA and model coincide, the test would prove nothing"
            torch.testing.assert_close(t.double(), expected[k][n], rtol=2e-6, atol=1e-6, msg=f"{n} decay {d}")
    assert torch.equal(ema.buffers["count"], model.count) and torch.equal(ema.buffers["stats"], model.stats)
    assert "scratch" not in ema.buffers
    assert ema.num_updates == 6


@requires_ext
@pytest.mark.parametrize("fp64", [False, True])
def test_extension_and_fallback_agree(fp64):
    torch.manual_seed(1)
    model = _Net()
    fast = EMA(model, decays=(0.999, 0.9), use_extension=True, fp64=fp64)
    slow = EMA(model, decays=(0.999, 0.9), use_extension=False, fp64=fp64)
    for step in range(5):
        _perturb(model, step)
        fast.update(model)
        slow.update(model)
    for d in (0.999, 0.9):
        for n, t in fast.shadow(d).items():
            # lerp and mul/add round differently: allow a few ulp, nothing like an algorithmic gap
            torch.testing.assert_close(t, slow.shadow(d)[n], rtol=1e-6, atol=1e-7, msg=n)


def test_fallback_notice_once(monkeypatch):
    monkeypatch.setattr(ema_mod, "_C", None)
    monkeypatch.setattr(ema_mod, "_noticed", set())
    emas, params = [torch.zeros(4)], [torch.ones(4)]
    with pytest.warns(RuntimeWarning, match="soflow_fast._C is not built.*torch._foreach_lerp_"):
        ema_update_(emas, params, 0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_update_(emas, params, 0.75)  # a second call stays quiet
        ema_update_multi_([emas], params, [0.75])
        copy_(emas, params)
    assert torch.equal(emas[0], torch.ones(4))
    with pytest.raises(RuntimeError, match="not built"):
        ema_update_(emas, params, 0.75, use_extension=True)


@requires_ext
def test_float16_parameters_fall_back(monkeypatch):
    monkeypatch.setattr(ema_mod, "_noticed", set())
    model = nn.Linear(4, 4).half()
    ema = EMA(model, decays=0.5)
    start = ema.shadow()["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.warns(RuntimeWarning, match="float32 or bfloat16 parameters, not torch.float16"):
        ema.update(model)
    torch.testing.assert_close(ema.shadow()["weight"], (start + model.weight.float()) / 2)


def test_every_and_fp64_storage():
    model = nn.Linear(3, 3)
    ema = EMA(model, decays=0.5, every=3, dtype=torch.float64)
    start = ema.shadow()["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(3):
        ema.update(model)  # only the first of each three calls averages, with 0.5**3
    assert ema.num_updates == 1 and ema.shadow()["weight"].dtype == torch.float64
    torch.testing.assert_close(ema.shadow()["weight"], start + 0.875, rtol=0, atol=1e-7)


def test_state_dict_round_trip():
    torch.manual_seed(2)
    model = _Net()
    ema = EMA(model, decays=(0.99, 0.9), every=2)
    for step in range(5):
        _perturb(model, step)
        ema.update(model)
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {"num_updates", "calls", "decays", "shadow.1.a.weight", "buffers.count"} <= set(state)

    other = EMA(_Net(), decays=(0.99, 0.9), every=2)
    other.load_state_dict({k: v.clone() for k, v in state.items()})
    assert (other.num_updates, other._calls) == (3, 5)
    for k in range(2):
        for n, t in ema.shadows[k].items():
            assert torch.equal(other.shadows[k][n], t), n
    # continuing from the restored state must follow the original exactly
    for step in range(5, 8):
        _perturb(model, step)
        ema.update(model)
        other.update(model)
    for k in range(2):
        for n, t in ema.shadows[k].items():
            assert torch.equal(other.shadows[k][n], t), n

    with raises_naming(ValueError, "(0.99, 0.9)", "0.99"):
        EMA(model, decays=0.99).load_state_dict(state)
    broken = dict(state)
    del broken["shadow.0.a.bias"]
    with raises_naming(KeyError, "missing", "shadow.0.a.bias"):
        other.load_state_dict(broken)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_single_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(3)
    model = _Net()
    ema = EMA(model, decays=(0.99, 0.9))
    _perturb(model, 0)
    ema.update(model)
    dcp.save({"ema": ema}, checkpoint_id=str(tmp_path))
    other = EMA(_Net(), decays=(0.99, 0.9))
    dcp.load({"ema": other}, checkpoint_id=str(tmp_path))
    assert other.num_updates == 1
    for k in range(2):
        for n, t in ema.shadows[k].items():
            assert torch.equal(other.shadows[k][n], t), n


def test_copy_to_swapped_and_wrapper_names():
    torch.manual_seed(4)
    model = _Net()
    compiled = torch.compile(model)  # adds `_orig_mod.` to names; the EMA keys must not change
    ema = EMA(compiled, decays=(0.5, 0.9))
    assert "a.weight" in ema.shadow()
    _perturb(model, 0)
    ema.update(compiled)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}

    with ema.swapped(compiled, decay=0.9) as inside:
        assert inside is compiled
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow(0.9)[n].to(p.dtype)), n
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n]), f"{n} not restored"

    plain = _Net()
    ema.copy_to(plain, decay=0.5)
    for n, p in plain.named_parameters():
        assert torch.equal(p, ema.shadow(0.5)[n].to(p.dtype)), n
    assert torch.equal(plain.stats, model.stats)
    with raises_naming(ValueError, "(0.5, 0.9)", "0.7"):
        ema.shadow(0.7)
    with pytest.raises(ValueError, match="model does not match this EMA"):
        ema.update(nn.Linear(2, 2))
