"""dsvl2.quant.kernels: every kernel equals dequantize-then-matmul within tolerance, for every scheme, group
size, activation dtype and row count; `dequantize()` is the exact inverse of the canonical scheme."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from dsvl2.quant import kernels

ROWS = (1, 3, 8, 64, 300)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("auto", "extension", "stock", "dequantize")
# (N, K): ordinary, N small, K not a multiple of 32 (int8) or of 64 (int4: 160), N not a multiple of 16.
INT8_SHAPES = ((64, 256), (5, 96), (24, 100), (33, 544))
INT4_SHAPES = ((64, 256), (5, 128), (40, 384), (48, 640), (8, 160))


def random_int8(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) * 0.02 + 0.001
    return q, scales


def random_int4(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    mins = -8 * scales + (torch.rand(n, k // group, generator=g) - 0.5) * 0.01
    return kernels.pack_int4(q), scales.half(), mins.half()  # int4 scales and mins are float16


def activations(rows: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, ::17] *= 8  # a few outlier channels, as hidden states have
    return x.to(dtype)


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as the C++ kernels see it: each row rounded to int8 in blocks of 32 columns (scale max |x| / 127),
    the same float32 operations in the same order, back in float32."""
    k = x.shape[-1]
    blocks = F.pad(x.float(), (0, -k % 32)).view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    mul = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    rounded = torch.round(blocks * mul) * (amax / 127.0)
    return rounded.view(x.shape[0], -1)[:, :k]


def rounding(module, rows: int) -> str:
    """What a module rounds the activations to at this many rows: int8 blocks, bfloat16, or nothing."""
    if isinstance(module, kernels._ExtensionMixin):
        return "int8" if module.max_rows is None or rows <= module.max_rows else "none"
    if isinstance(module, kernels.Int8Stock):
        return "bf16" if rows <= module.max_rows else "none"
    return "bf16" if isinstance(module, kernels.Int4StockCPU) else "none"


def assert_matches(module, x: torch.Tensor, w: torch.Tensor) -> None:
    """module(x) equals x @ w.T (float32) within what the module's roundings allow: float32 accumulation (1e-4
    of |x| @ |w|.T) and the output's dtype; for kernels that round x to int8 blocks the reference takes the
    rounded x (int8_blocks: so the kernel's arithmetic is checked to float precision, not just its error's
    size), for bfloat16 activations and scales 2e-2 of |x| @ |w|.T more."""
    out = module(x)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    kind = rounding(module, x.shape[0])
    xr = int8_blocks(x) if kind == "int8" else x.float()
    ref = F.linear(xr, w)
    size = F.linear(xr.abs(), w.abs())
    tol = 1e-4 * size + 1e-5
    if x.dtype != torch.float32:
        tol = tol + ref.abs() * (2**-8 if x.dtype == torch.bfloat16 else 2**-11)
    if kind == "bf16":
        tol = tol + 2e-2 * size
    err = (out.float() - ref).abs()
    assert bool((err <= tol).all()), f"{module.kernel}: error {err.max().item():.3g} ({kind} rounding)"


def extension_buildable() -> bool:
    """An AVX2 CPU and a C++ compiler: the C++ kernels must then build and pass their self-check."""
    return bool(kernels.isa_options(kernels.cpu_flags()) and (shutil.which("c++") or shutil.which("g++")))


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    monkeypatch.setenv(kernels.ENV_KERNEL, request.param)
    if request.param == "extension" and extension_buildable():
        lib, line = kernels.extension()
        assert lib is not None, line  # else "extension" would quietly test the stock kernels
    return request.param


@pytest.mark.parametrize("shape", INT8_SHAPES)
def test_int8_matches_dequantize_then_matmul(mode, shape):
    q, scales = random_int8(*shape)
    module = kernels.prepare_int8(q, scales, "cpu")
    w = kernels.dequantize_int8(q, scales)
    assert torch.equal(module.dequantize(), w)
    for dtype in DTYPES:
        for rows in ROWS:
            assert_matches(module, activations(rows, shape[1], dtype), w)


@pytest.mark.parametrize("group", kernels.GROUP_SIZES)
@pytest.mark.parametrize("shape", INT4_SHAPES)
def test_int4_matches_dequantize_then_matmul(mode, shape, group):
    if shape[1] % group:
        pytest.skip("group does not divide K")
    qweight, scales, mins = random_int4(*shape, group)
    module = kernels.prepare_int4(qweight, scales, mins, group, "cpu")
    w = kernels.dequantize_int4(qweight, scales, mins, group)
    assert torch.equal(module.dequantize(), w)
    for dtype in DTYPES:
        for rows in ROWS:
            assert_matches(module, activations(rows, shape[1], dtype), w)


def test_leading_dimensions_and_empty_input():
    q, scales = random_int8(16, 64)
    module = kernels.prepare_int8(q, scales, "cpu")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    assert module(x).shape == (2, 3, 16)
    assert module(torch.randn(0, 64)).shape == (0, 16)
    with pytest.raises(ValueError, match="64 input features"):
        module(torch.randn(1, 63))


def test_canonical_int4_layout():
    """Low nibble = even input column; w = q * scale + min per group."""
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8).repeat(1, 8)  # [1, 32]
    packed = kernels.pack_int4(q)
    assert packed[0, 0].item() == 1 | (2 << 4) and packed[0, 1].item() == 15
    assert torch.equal(kernels.unpack_int4(packed), q)
    w = kernels.dequantize_int4(packed, torch.tensor([[0.5]]), torch.tensor([[-1.0]]), 32)
    assert w[0, :4].tolist() == [-0.5, 0.0, 6.5, -1.0]


def test_modules_are_buffers_only_and_name_their_kernel(mode):
    qweight, scales, mins = random_int4(32, 128, 64)
    module = kernels.prepare_int4(qweight, scales, mins, 64, "cpu")
    assert list(module.parameters()) == []
    assert module.kernel and module.kernel in repr(module)
    if mode == "dequantize":
        assert "dequantize" in module.kernel


def test_bad_inputs_are_named():
    q, scales = random_int8(8, 64)
    with pytest.raises(ValueError, match="int8 scales"):
        kernels.prepare_int8(q, scales[:4], "cpu")
    qweight, s4, m4 = random_int4(8, 96, 32)
    with pytest.raises(ValueError, match="does not divide"):
        kernels.prepare_int4(qweight, s4, m4, 64, "cpu")
    with pytest.raises(ValueError, match="group size"):
        kernels.prepare_int4(qweight, s4, m4, 48, "cpu")


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV_KERNEL, "fastest")
    q, scales = random_int8(8, 64)
    with pytest.raises(ValueError, match=kernels.ENV_KERNEL):
        kernels.prepare_int8(q, scales, "cpu")


def test_extension_mode_runs_the_cpp_kernels_where_they_build(monkeypatch):
    lib, line = kernels.extension()
    assert kernels.extension()[0] is lib  # built and loaded once per process
    if not extension_buildable():
        pytest.skip(line)
    assert lib is not None, line
    monkeypatch.setenv(kernels.ENV_KERNEL, "extension")
    q, scales = random_int8(8, 64)
    assert isinstance(kernels.prepare_int8(q, scales, "cpu"), kernels.Int8Extension)
    qweight, s4, m4 = random_int4(8, 64, 32)
    assert isinstance(kernels.prepare_int4(qweight, s4, m4, 32, "cpu"), kernels.Int4Extension)


def test_ctypes_binding_where_python_headers_are_missing(monkeypatch, tmp_path):
    """The plain-library build (no Python.h) through ctypes gives the same results."""
    lib, line = kernels.extension()
    if lib is None:
        pytest.skip(line)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-headers")})
    isa, name = kernels.isa_options(kernels.cpu_flags())
    path, python = kernels._build(isa)
    assert not python
    plain = kernels._bind(path, python)
    q, scales = random_int8(12, 160)
    qweight, s4, m4 = random_int4(12, 160, 32)
    x = activations(3, 160, torch.bfloat16)
    for module in (kernels.Int8Extension(plain, name, q, scales, 64),
                   kernels.Int4Extension(plain, name, qweight, s4, m4, 32, 64)):
        assert_matches(module, x, module.dequantize())


def test_stock_kernels_when_the_extension_cannot_build(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_extension", None)
    lib, line = kernels.extension()
    assert lib is None and "unavailable" in line
    q, scales = random_int8(16, 64)
    module = kernels.prepare_int8(q, scales, "cpu")
    assert module.kernel.startswith("int8-stock")
    x = activations(3, 64, torch.bfloat16)
    assert_matches(module, x, kernels.dequantize_int8(q, scales))


def test_int4_prepared_weights_hold_float16_scales_and_mins(mode):
    """No kernel keeps float32 copies of the per-group scales and mins (1 bit per weight with groups of 64);
    float32 ones given to prepare_int4 are rounded to float16, as dequantize() shows."""
    qweight, scales, mins = random_int4(32, 128, 64)
    module = kernels.prepare_int4(qweight, scales.float() + 1e-5, mins.float(), 64, "cpu")
    assert not [name for name, b in module.named_buffers() if b.dtype == torch.float32]
    assert {b.dtype for name, b in module.named_buffers() if "scales" in name or "mins" in name} <= {
        torch.float16, torch.bfloat16}
    rounded = (scales.float() + 1e-5).half()
    assert torch.equal(module.dequantize(), kernels.dequantize_int4(qweight, rounded, mins, 64))


@pytest.mark.parametrize(("n", "k"), [(1, 32), (5, 96), (8, 160), (13, 256), (64, 1024)])
def test_layout_conversions_in_cpp_equal_the_pytorch_ones_and_invert(n, k):
    """The C++ conversions (load time) and the PyTorch ones give the same bytes, and from_* inverts them: N not a
    multiple of the tile, K not a multiple of 64 (int4) or of 32 (int8, K + 3)."""
    lib, line = kernels.extension()
    assert lib is not None or not extension_buildable(), line  # else only the PyTorch conversions would be tested
    g = torch.Generator().manual_seed(n * k)
    q4 = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    q8 = torch.randint(-128, 128, (n, k + 3), generator=g, dtype=torch.int8)
    s4 = torch.randn(n, k // 32, generator=g).half()
    ways = [None] if lib is None else [None, lib]
    for way in ways:
        tiled = kernels.to_int4_kernel_layout(q4, way)
        assert tiled.shape == (-(-n // 4), -(-k // 64), 4, 32)
        assert torch.equal(kernels.from_int4_kernel_layout(tiled, n, k), kernels.unpack_int4(q4))
        # Byte i of chunk 0 of row 0: column i in the low nibble, column 32 + i in the high one.
        want = kernels.unpack_int4(q4)[0]
        want = F.pad(want, (0, 64 - min(k, 64)))
        assert torch.equal(tiled[0, 0, 0], want[:32] | (want[32:64] << 4))
        padded_n, padded_k = tiled.shape[0] * 4, tiled.shape[1] * 64  # the padding holds zeros
        assert torch.equal(kernels.from_int4_kernel_layout(tiled, padded_n, padded_k),
                           F.pad(kernels.unpack_int4(q4), (0, padded_k - k, 0, padded_n - n)))
        tiled8 = kernels.to_int8_kernel_layout(q8, way)
        assert torch.equal(kernels.from_int8_kernel_layout(tiled8, n, k + 3), q8)
        assert torch.equal(kernels.from_int8_kernel_layout(tiled8, padded_n, tiled8.shape[1] * 32),
                           F.pad(q8, (0, tiled8.shape[1] * 32 - k - 3, 0, padded_n - n)))
        groups = kernels.to_group_tiles(s4, way)
        assert groups.dtype == torch.float16 and torch.equal(kernels.from_group_tiles(groups, n), s4)
    if lib is not None:
        assert torch.equal(kernels.to_int4_kernel_layout(q4, lib), kernels.to_int4_kernel_layout(q4))
        assert torch.equal(kernels.to_int8_kernel_layout(q8, lib), kernels.to_int8_kernel_layout(q8))
        assert torch.equal(kernels.to_group_tiles(s4, lib), kernels.to_group_tiles(s4))
