"""Print the Triton scan kernels of coupled-elementwise states for an m x m block: s_t = A_t s_(t-1) + b_t per element.

The coupled-elementwise class (recurrence_dsl/analysis.py, `Block`) holds m states of one shape whose updates read
each other element by element: per element an m-vector s and an m x m transition A_t (a cascade of diagonal
decays, a complex diagonal written as a real and an imaginary state, either with further states fed from them).
`codegen/triton_scan.py` runs these blocks with the kernels printed here, one pair per m:

  _block{m}_combine          ([A1], [b1]) then ([A2], [b2]) -> (A2 A1, A2 b1 + b2), the m * m + m entries one by one
  _block{m}_scan_fwd_kernel  (cdiv(N, BN), B)  s [B, T, N, m] from a [B, T, N, m, m], b [B, T, N, m], h0 [B, N, m]
  _block{m}_scan_bwd_kernel  (cdiv(N, BN), B)  da, db, dh0 from ds and the saved s

Each entry of A_t and b_t is its own [BT, BN] tile and `tl.associative_scan` scans the m * m + m tiles together
with the printed combine (the composition of affine maps is associative: Blelloch 1990, "Prefix sums and their
applications", section 1.4); a program walks its chunks of BT steps in order and carries the m states across
chunks, as the diagonal kernel does. The backward scans g_t = ds_t + A_(t+1)^T g_(t+1) from the last step with
`reverse=True` (the loaded A_(t+1) handed to the combine as its transpose) and writes db_t = g_t,
dA_t = g_t s_(t-1)^T and dh0 = A_0^T g_0 (docstring of `codegen/triton_scan.py`).

The blocks are dense: a structural zero of A (a cascade's upper triangle) is scanned like any entry, so one pair of
kernels serves every spec with m states. The tiles grow as m * m, so the states per program shrink with m
(`_SCAN_BN_BLOCK` in `codegen/triton_scan.py`) to keep the kernels free of spills at sm_80 / sm_90 (`recdsl kernels
... --form scan --backward`; tests/test_triton_scan.py); beyond `MAX_BLOCK` states the Triton backend offers no scan
form and the analysis says so (`triton_scan_refusal`).

A generated module carries the printed kernels of the sizes its layers use (`codegen/module.py`) and registers them
in `_BLOCK_KERNELS`; imported from the package, `codegen.triton_scan.scan_block` prints and loads any size on
first use (`load_block_kernels`).
"""

from __future__ import annotations

import functools

# The most coupled states a block of the Triton scan takes: at 4, 20 scanned tiles already need 8 state elements a
# program to stay below 255 registers (168 at sm_90, bf16); 5 would need 30 tiles.
MAX_BLOCK = 4

def triton_scan_refusal(m: int) -> str | None:
    """Why the Triton backend has no scan form for m coupled states, or None when it has one."""
    if m > MAX_BLOCK:
        return (f"the Triton scan kernels take blocks of at most {MAX_BLOCK} coupled states and this block has {m} "
                f"(its {m * m + m} scanned tiles would spill); the torch scan form (backend='torch') takes any size")
    return None


def _names(prefix: str, m: int, suffix: str = "") -> tuple[list[str], list[str]]:
    """([prefix a00, a01, ...] row by row, [prefix x0, x1, ...]) for an m x m block and its m-vector."""
    return ([f"{prefix}a{r}{c}{suffix}" for r in range(m) for c in range(m)],
            [f"{prefix}x{r}{suffix}" for r in range(m)])


def _grouped(names: list[str], m: int, indent: str, first: str = "", last: str = "") -> list[str]:
    """`names` (a block's m * m entries then its m-vector) as lines of m names each, after `first` and before
    `last`, the lines after the first indented by `indent`."""
    rows = [", ".join(names[i:i + m]) for i in range(0, len(names), m)]
    lines = [f"{indent if n else ''}{row}," for n, row in enumerate(rows)]
    lines[0], lines[-1] = first + lines[0], lines[-1][:-1] + last
    return lines


def _combine(m: int) -> list[str]:
    a1, x1 = _names("", m, "_1")
    a2, x2 = _names("", m, "_2")
    head = f"def _block{m}_combine("
    lines = ["@triton.jit"]
    lines += _grouped(a1 + x1 + a2 + x2, m, " " * len(head), head, "):")
    lines += [f'    """(A1, x1) then (A2, x2), {m} x {m} row-major: the affine map s -> A2 (A1 s + x1) + x2."""',
              "    return ("]
    for r in range(m):
        for c in range(m):
            entry = " + ".join(f"a{r}{k}_2 * a{k}{c}_1" for k in range(m))
            lines.append(f"        {entry}," + (f"  # row {r} of A2 A1" if c == 0 else ""))
    for r in range(m):
        entry = " + ".join([f"a{r}{k}_2 * x{k}_1" for k in range(m)] + [f"x{r}_2"])
        lines.append(f"        {entry}{',' if r < m - 1 else ''}" + ("  # A2 x1 + x2" if r == 0 else ""))
    lines.append("    )")
    return lines


def _scan_call(targets: list[str], operands: list[str], m: int, tail: str, note: str = "") -> list[str]:
    """`(targets) = tl.associative_scan((operands), 0, tail)`, m names a line."""
    lines = _grouped(targets, m, "         ", "        (", ") = tl.associative_scan(")
    lines += _grouped(operands, m, "             ", "            (", f"), 0, {tail}){note}")
    return lines


# The first lines of both kernels: the program's sequence i_b and block of state elements o_n on one grid axis, and
# where the sequence starts (its own row, or cu[i_b] in the packed row, whose length T then is its own).
_PREAMBLE = (
    "    NB = tl.cdiv(N, BN)  # one grid axis of B * NB programs (a CUDA grid's second axis stops at 65535)",
    "    i_b, i_n = tl.program_id(0) // NB, tl.program_id(0) % NB",
    "    o_n = i_n * BN + tl.arange(0, BN)",
    "    m_n = o_n < N",
    "    if VARLEN:  # sequence i_b of the packed row: steps cu[i_b] .. cu[i_b + 1]",
    "        bos = tl.load(cu + i_b).to(tl.int64)",
    "        T = (tl.load(cu + i_b + 1) - bos).to(tl.int32)",
    "    else:",
    "        bos = i_b.to(tl.int64) * T",
    "    base = bos * N  # the sequence's first step in [B, T, N]",
)


def _forward(m: int) -> list[str]:
    a, x = _names("b_", m)
    mm = m * m
    lines = ["@triton.jit",
             f"def _block{m}_scan_fwd_kernel(",
             "    a, b, h0, s, cu, T, N, BT: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr,",
             "):",
             f'    """{m} x {m} blocks: s [B, T, N, {m}] from a [B, T, N, {m}, {m}], b [B, T, N, {m}] and h0 '
             f'[B, N, {m}]."""',
             *_PREAMBLE,
             "    last = (tl.arange(0, BT) == BT - 1)[:, None]  # the chunk's last row, selected (a sum of one term)",
             f"    p_h0 = h0 + (i_b.to(tl.int64) * N + o_n) * {m}"]
    for r in range(m):
        lines.append(f"    b_h{r} = tl.load(p_h0 + {r}, mask=m_n, other=0.0).to(s.dtype.element_ty)"
                     + ("  # [BN] the states entering the chunk" if r == 0 else ""))
    lines += ["    for i_t in range(0, tl.cdiv(T, BT)):",
              "        o_t = i_t * BT + tl.arange(0, BT)",
              "        m = (o_t < T)[:, None] & m_n[None, :]",
              "        off = base + o_t[:, None].to(tl.int64) * N + o_n[None, :]  # [BT, BN] element index",
              "        # A_t row-major (row r: the coefficients of every state in state r's update); padded steps: I"]
    for r in range(m):
        for c in range(m):
            other = "1.0" if r == c else "0.0"
            lines.append(f"        b_a{r}{c} = tl.load(a + off * {mm} + {r * m + c}, mask=m, other={other})"
                         ".to(s.dtype.element_ty)")
    for r in range(m):
        lines.append(f"        b_x{r} = tl.load(b + off * {m} + {r}, mask=m, other=0.0).to(s.dtype.element_ty)")
    lines += _scan_call(a + x, a + x, m, f"_block{m}_combine", "  # the chunk from a zero start")
    for r in range(m):
        terms = " + ".join(f"b_a{r}{c} * b_h{c}[None, :]" for c in range(m))
        lines.append(f"        b_s{r} = {terms} + b_x{r}")
    for r in range(m):
        lines.append(f"        tl.store(s + off * {m} + {r}, b_s{r}.to(s.dtype.element_ty), mask=m)")
    for r in range(m):
        lines.append(f"        b_h{r} = tl.sum(tl.where(last, b_s{r}, 0.0), axis=0)"
                     + ("  # the state after the chunk" if r == 0 else ""))
    return lines


def _backward(m: int) -> list[str]:
    a, x = _names("b_", m)
    mm = m * m
    # the loaded A_(t+1) enters the combine transposed: position (r, c) of the scan takes entry (c, r)
    transposed = [f"b_a{c}{r}" for r in range(m) for c in range(m)] + [f"b_d{r}" for r in range(m)]
    scanned = a + [f"b_d{r}" for r in range(m)]
    dt = "da.dtype.element_ty"
    lines = ["@triton.jit",
             f"def _block{m}_scan_bwd_kernel(",
             "    a, s, h0, ds, da, db, dh0, cu, T, N, BT: tl.constexpr, BN: tl.constexpr, VARLEN: tl.constexpr,",
             "):",
             f'    """{m} x {m} blocks: da [B, T, N, {m}, {m}], db [B, T, N, {m}] and dh0 [B, N, {m}] from ds and the '
             'saved s."""',
             *_PREAMBLE,
             "    first_row = (tl.arange(0, BT) == 0)[:, None]",
             f"    p_h0 = h0 + (i_b.to(tl.int64) * N + o_n) * {m}"]
    for r in range(m):
        lines.append(f"    b_i{r} = tl.load(p_h0 + {r}, mask=m_n, other=0.0).to({dt})"
                     + ("  # the initial state, s_(-1)" if r == 0 else ""))
    for r in range(m):
        lines.append(f"    b_g{r} = tl.zeros([BN], dtype={dt})" + ("  # g at the first step after the chunk"
                                                                   if r == 0 else ""))
    lines += ["    NT = tl.cdiv(T, BT)",
              "    for i_r in range(0, NT):",
              "        i_t = NT - 1 - i_r",
              "        o_t = i_t * BT + tl.arange(0, BT)",
              "        m = (o_t < T)[:, None] & m_n[None, :]",
              "        off = base + o_t[:, None].to(tl.int64) * N + o_n[None, :]",
              "        # A_(t+1), which carries g_(t+1) back to step t (past the end: I)",
              "        m_next = (o_t + 1 < T)[:, None] & m_n[None, :]",
              f"        p_an = a + (off + N) * {mm}"]
    for r in range(m):
        for c in range(m):
            other = "1.0" if r == c else "0.0"
            lines.append(f"        b_a{r}{c} = tl.load(p_an + {r * m + c}, mask=m_next, other={other}).to({dt})")
    for r in range(m):
        lines.append(f"        b_d{r} = tl.load(ds + off * {m} + {r}, mask=m, other=0.0).to({dt})")
    lines.append("        # scanned as A_(t+1)^T: afterwards b_a.. hold the entries of the products of the transposes")
    lines += _scan_call(scanned, transposed, m, f"_block{m}_combine, reverse=True")
    for r in range(m):
        terms = " + ".join(f"b_a{r}{c} * b_g{c}[None, :]" for c in range(m))
        lines.append(f"        b_gt{r} = {terms} + b_d{r}" + ("  # [BT, BN] g_t" if r == 0 else ""))
    lines.append("        m_prev = (o_t >= 1)[:, None] & m")
    lines.append("        first = (o_t == 0)[:, None]")
    for r in range(m):
        lines.append(f"        b_s{r} = tl.load(s + (off - N) * {m} + {r}, mask=m_prev, other=0.0).to({dt})"
                     + ("  # s_(t-1)" if r == 0 else ""))
        lines.append(f"        b_s{r} = tl.where(first, b_i{r}[None, :], b_s{r})")
    for r in range(m):
        lines.append(f"        tl.store(db + off * {m} + {r}, b_gt{r}.to(db.dtype.element_ty), mask=m)")
    for r in range(m):
        for c in range(m):
            lines.append(f"        tl.store(da + off * {mm} + {r * m + c}, (b_gt{r} * b_s{c}).to({dt}), mask=m)"
                         + ("  # dA_t = g_t s_(t-1)^T" if r == c == 0 else ""))
    for r in range(m):
        lines.append(f"        b_g{r} = tl.sum(tl.where(first_row, b_gt{r}, 0.0), axis=0)")
    lines += ["    # the initial state's gradient A_0^T g_0 (an empty sequence of a packed row has no step 0, and its",
              "    # g is zero; a row of its own has T >= 1, the launcher's rule)",
              "    if VARLEN:  # (a tensor compare: T is a plain int in the interpreter)",
              "        m_0 = m_n & (tl.zeros_like(m_n.to(tl.int32)) < T)",
              "    else:",
              "        m_0 = m_n",
              f"    p_a0 = a + (base + o_n) * {mm}"]
    for r in range(m):
        for c in range(m):
            lines.append(f"    b_a{r}{c} = tl.load(p_a0 + {r * m + c}, mask=m_0, other=0.0).to({dt})")
    lines.append(f"    p_dh0 = dh0 + (i_b.to(tl.int64) * N + o_n) * {m}")
    for c in range(m):
        terms = " + ".join(f"b_a{r}{c} * b_g{r}" for r in range(m))
        lines.append(f"    tl.store(p_dh0 + {c}, ({terms}).to(dh0.dtype.element_ty), mask=m_n)")
    return lines


def block_scan_source(m: int) -> str:
    """The three functions of the m x m block scan (combine, forward and backward kernels) as Python source that
    needs `triton` and `triton.language as tl` in scope, followed by their entry in `_BLOCK_KERNELS`.

    Raises ValueError for m < 2 (one state is the diagonal scan) or m > MAX_BLOCK."""
    if not isinstance(m, int) or m < 2 or m > MAX_BLOCK:
        raise ValueError(f"the block scan kernels take 2 to {MAX_BLOCK} coupled states, got m = {m!r}")
    parts = ["\n".join(_combine(m)), "\n".join(_forward(m)), "\n".join(_backward(m)),
             f"_BLOCK_KERNELS[{m}] = (_block{m}_scan_fwd_kernel, _block{m}_scan_bwd_kernel)"]
    return "\n\n\n".join(parts) + "\n"


@functools.cache
def load_block_kernels(m: int) -> tuple:
    """(forward, backward) Triton kernels of the m x m block scan, printed by `block_scan_source` and imported from
    the module cache (Triton reads a kernel's source from its file). Raises ValueError as `block_scan_source`."""
    from .cache import load_source

    header = "import triton\nimport triton.language as tl\n\n_BLOCK_KERNELS = {}\n\n\n"
    module = load_source(header + block_scan_source(m), f"block{m}_scan")
    return module._BLOCK_KERNELS[m]


__all__ = ["MAX_BLOCK", "block_scan_source", "load_block_kernels", "triton_scan_refusal"]
