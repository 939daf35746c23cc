"""Breadth: generated `.rec` recurrences, every form the analysis offers against the float64 reference.

A seeded generator writes small but valid and numerically stable programs from templates: a scalar, vector or matrix
state, a delta rule, a DeltaProduct (2 or 3 delta updates of one state per step: the rank-r update class; the
state assigned r times, or once with the r updates in one expression), two states in one recurrence, a 3-axis state
read over its pair, or a cascade of 2, 3 or 4 vector states each reading the one before (coupled-elementwise: an
m x m block per element, scanned); a decay that is absent, an
`exp(...)` of an input (scalar, key axis, value axis), a constant (`0.9`, `exp(-1 / 8)`), a size expression
(`(1 - 1 / K)`), a positive non-exp decay (`sigmoid(a)`, `1 - sigmoid(a)`, a plain input or param), or a param-driven
`exp(-softplus(A[i]) * dt)`; constants in other places (a constant key or query, scale factors `/ sqrt(K)`,
`K ** -0.5`, `sigmoid(2.0)`, a constant beta, a constant injection `c = a * c + 1`); readouts before and after the
update, two readouts of one state, outputs combining two states and non-linear functions of a readout.

Inputs come from `sample_arguments` (log-decays negative, delta-rule keys unit-norm, gates in (0, 1)), with an
initial state, rounded to float32 once so that one float64 reference run serves both dtypes. Every torch form runs
in float64 (relative error <= 1e-9) and float32 (<= 1e-4) at T = 5 and T = 19 (chunk size 8: several chunks and a
partial one); every Triton form runs in float32 (<= 1e-4) at T = 5 and 19 with chunk size 16. Errors are
||x - ref|| / ||ref|| over each output and final state. A test collects every failing (form, dtype, length) of one
program, so one crash does not hide the rest, and prints the program text with them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest
import torch

import recurrence_dsl
from recurrence_dsl.cli import main as recdsl_main
from recurrence_dsl.sampling import sample_arguments

from .test_forms import flatten

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-9, F32: 1e-4}
LENGTHS = (5, 19)
TORCH_CHUNK = 8
TRITON_CHUNK = 16
TRITON_LENGTHS = (5, 19)
# The generator's seed; RECDSL_BREADTH_SEED=N explores other programs (the features cycled through stay the same).
SEED = int(os.environ.get("RECDSL_BREADTH_SEED", "20261123"))

# ---------------------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Builder:
    """Declarations and statements of one recurrence, rendered as `.rec` text."""

    name: str
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    states: dict[str, tuple[str, ...]] = field(default_factory=dict)
    outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    features: set[str] = field(default_factory=set)

    def inp(self, name: str, *dims: str) -> str:
        assert self.inputs.setdefault(name, dims) == dims, (name, dims)
        return name

    def par(self, name: str, *dims: str) -> str:
        assert self.params.setdefault(name, dims) == dims, (name, dims)
        return name

    def text(self) -> str:
        def decl(name, dims):
            return f"{name}[{', '.join(dims)}]" if dims else name

        sig = ", ".join(decl(n, d) for n, d in self.inputs.items())
        outs = ", ".join(decl(n, d) for n, d in self.outputs.items())
        body = []
        if self.params:
            body.append("param " + ", ".join(decl(n, d) for n, d in self.params.items()))
        body.append("state " + ", ".join(decl(n, d) for n, d in self.states.items()))
        body += self.lines
        return f"recurrence {self.name}({sig}) -> {outs} {{\n" + "".join(f"    {s}\n" for s in body) + "}\n"


# Decay kinds. `axes` maps "key"/"value" to (index, size) of the state being decayed (empty for a scalar
# state); a vector-indexed kind falls back to its scalar version there.
DECAY_KINDS = ["none", "exp_scalar", "exp_key", "exp_value", "const", "const_exp", "size_expr", "sigmoid_scalar",
               "sigmoid_key", "softplus_param", "input_plain", "param_plain"]


def decay_text(b: Builder, kind: str, axes: dict[str, tuple[str, str]], suffix: str = "") -> str | None:
    """The decay factor of kind `kind` (declaring what it reads), or None for no decay."""
    key = axes.get("key")
    value = axes.get("value")
    b.features.add(f"decay:{kind}")
    if kind == "none":
        return None
    if kind == "exp_scalar":
        return f"exp({b.inp('g' + suffix)})"
    if kind == "exp_key":
        if key is None:
            return f"exp({b.inp('g' + suffix)})"
        return f"exp({b.inp('g' + suffix, key[1])}[{key[0]}])"
    if kind == "exp_value":
        if value is None:
            return f"exp({b.inp('g' + suffix)})"
        return f"exp({b.inp('gv' + suffix, value[1])}[{value[0]}])"
    if kind == "const":
        return "0.9" if not suffix else "0.8"
    if kind == "const_exp":
        return "exp(-1 / 8)" if not suffix else "exp(-0.25)"
    if kind == "size_expr":
        size = (key or value)[1]
        return f"(1 - 1 / {size})"
    if kind == "sigmoid_scalar":
        return f"sigmoid({b.inp('a' + suffix)})"
    if kind == "sigmoid_key":
        if key is None:
            return f"sigmoid({b.inp('a' + suffix)})"
        return f"sigmoid({b.inp('a' + suffix, key[1])}[{key[0]}])"
    if kind == "complement_sigmoid":  # GRU's z gate: the log decay is logsigmoid(-a)
        if key is None:
            return f"(1 - sigmoid({b.inp('a' + suffix)}))"
        return f"(1 - sigmoid({b.inp('a' + suffix, key[1])}[{key[0]}]))"
    if kind == "softplus_param":
        dt = b.inp("dt" + suffix)
        if key is None:
            return f"exp(-softplus({b.par('A' + suffix)}) * {dt})"
        return f"exp(-softplus({b.par('A' + suffix, key[1])}[{key[0]}]) * {dt})"
    if kind == "input_plain":
        if key is None:
            return b.inp("w" + suffix)
        return f"{b.inp('w' + suffix, key[1])}[{key[0]}]"
    if kind == "param_plain":
        return b.par("gamma" + suffix)
    raise AssertionError(kind)


def decayed(decay: str | None, term: str) -> str:
    return term if decay is None else f"{decay} * {term}"


SCALES = ["", "K ** -0.5 * ", "/ sqrt(K)", "sigmoid(2.0) * ", "0.5 * "]


def scaled(scale: str, core: str) -> str:
    return f"{core} / sqrt(K)" if scale == "/ sqrt(K)" else f"{scale}{core}"


def matrix_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """S[K, V] = decay * S + key * v^T, read out by a query; variants by `n` so each option shows up."""
    b.states["S"] = ("K", "V")
    dec = decay_text(b, decay, {"key": ("i", "K"), "value": ("j", "V")})
    const_key = n % 4 == 1
    const_query = n % 4 == 2
    key = "" if const_key else f"{b.inp('k', 'K')}[i] * "
    b.features.add("const_key" if const_key else "key")
    update = f"S[i, j] = {decayed(dec, 'S[i, j]')} + {key}{b.inp('v', 'V')}[j]"
    query = "" if const_query else f"{b.inp('q', 'K')}[i] * "
    b.features.add("const_query" if const_query else "query")
    scale = SCALES[n % len(SCALES)]
    b.features.add(f"scale:{scale}")
    readout = scaled(scale, f"sum(i, {query}S[i, j])")
    if n % 3 == 2:
        readout = f"tanh({readout})"
        b.features.add("tanh_readout")
    before = n % 5 == 3
    b.features.add("readout_before" if before else "readout_after")
    b.outputs["o"] = ("V",)
    reads = [f"o[j] = {readout}"]
    second = rng.choice([None, None, "key_side", "value_side"])
    if second == "key_side":
        b.outputs["p"] = ("V",)
        reads.append(f"p[j] = sum(i, {b.inp('r', 'K')}[i] * S[i, j])")
    elif second == "value_side":
        b.outputs["p"] = ("K",)
        reads.append("p[i] = sum(j, S[i, j])")
    if second:
        b.features.add("two_readouts")
    b.lines += reads + [update] if before else [update] + reads


DELTA_DECAYS = ["none", "exp_scalar", "const", "const_exp", "size_expr", "sigmoid_scalar", "softplus_param",
                "input_plain", "param_plain", "exp_key"]
BETAS = ["beta", "0.5", "sigmoid(b)"]


def delta_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """A (gated) delta rule with a temporary prediction error against the decayed state."""
    b.states["S"] = ("K", "V")
    dec = decay_text(b, decay, {"key": ("i", "K")} if decay in ("exp_key", "size_expr") else {})
    k, v = b.inp("k", "K"), b.inp("v", "V")
    beta = BETAS[n % len(BETAS)]
    if beta == "beta":
        b.inp("beta")
    elif beta == "sigmoid(b)":
        b.inp("b")
    b.features.add(f"beta:{beta}")
    q = b.inp("q", "K")
    scale = SCALES[(n + 1) % len(SCALES)]
    b.features.add(f"scale:{scale}")
    readout = scaled(scale, f"sum(i, {q}[i] * S[i, j])")
    if n % 4 == 3:
        readout = f"tanh({readout})"
        b.features.add("tanh_readout")
    b.outputs["o"] = ("V",)
    update = [f"u[j] = {v}[j] - sum(i, {k}[i] * {decayed(dec, 'S[i, j]')})",
              f"S[i, j] = {decayed(dec, 'S[i, j]')} + {beta} * {k}[i] * u[j]"]
    before = n % 3 == 1
    b.features.add("readout_before" if before else "readout_after")
    b.lines += [f"o[j] = {readout}"] + update if before else update + [f"o[j] = {readout}"]
    b.features.add("delta")


def product_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """DeltaProduct: r = 2 or 3 delta updates of one state per step (the state assigned r times; for n = 4 once,
    the r updates in one expression), a decay on the first (or, with `n` odd, written as an assignment of its own
    before them), the readout after the last or, for n = 1, before the first and after the last."""
    b.states["S"] = ("K", "V")
    r = 2 + n % 2
    dec = decay_text(b, decay, {"key": ("i", "K")} if decay in ("exp_key", "size_expr") else {})
    q = b.inp("q", "K")
    b.outputs["o"] = ("V",)
    if n == 1:
        b.outputs["p"] = ("V",)
        b.lines.append(f"p[j] = sum(i, {q}[i] * S[i, j])")
        b.features.add("readout_before")
    if dec is not None and n % 2:
        b.lines.append(f"S[i, j] = {dec} * S[i, j]")
        b.features.add("product:decay_alone")
        dec = None
    if n == 4:  # the r updates as ONE assignment: u_m reads the state as the updates before it left it
        start, updates = decayed(dec, "S[i, j]"), ""
        for m in range(1, r + 1):
            k, v, beta = b.inp(f"k{m}", "K"), b.inp(f"v{m}", "V"), b.inp(f"b{m}")
            b.lines.append(f"u{m}[j] = {v}[j] - sum(i, {k}[i] * ({start}{updates}))")
            updates += f" + {beta} * {k}[i] * u{m}[j]"
        b.lines.append(f"S[i, j] = {start}{updates}")
        b.features.add("product:one_assignment")
    for m in range(1, r + 1) if n != 4 else ():
        k, v, beta = b.inp(f"k{m}", "K"), b.inp(f"v{m}", "V"), b.inp(f"b{m}")
        b.lines.append(f"u{m}[j] = {v}[j] - sum(i, {k}[i] * {decayed(dec, 'S[i, j]')})")
        b.lines.append(f"S[i, j] = {decayed(dec, 'S[i, j]')} + {beta} * {k}[i] * u{m}[j]")
        dec = None  # only the first update carries the decay
    b.lines.append(f"o[j] = K ** -0.5 * sum(i, {q}[i] * S[i, j])")
    b.features.add(f"product:r{r}")


VECTOR_DECAYS = ["none", "exp_scalar", "exp_key", "const", "const_exp", "size_expr", "sigmoid_scalar",
                 "sigmoid_key", "softplus_param", "input_plain", "param_plain"]


def vector_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """h[D] = decay * h + injection, read out element-wise or contracted."""
    b.states["h"] = ("D",)
    dec = decay_text(b, decay, {"key": ("d", "D"), "value": ("d", "D")})
    injections = ["x[d]", "1", "x[d] + 1"] + ([f"(1 - {dec}) * x[d]"] if dec else [])
    inject = injections[n % len(injections)]
    if inject == "1":
        b.features.add("const_injection")
    else:
        b.inp("x", "D")
    b.lines.append(f"h[d] = {decayed(dec, 'h[d]')} + {inject}")
    kind = rng.choice(["copy", "gate", "tanh", "dot", "sqrt"])
    if not b.inputs and kind not in ("gate", "dot"):
        kind = "gate"  # a recurrence needs an input (its batch and length come from one)
    if kind in ("dot", "sqrt"):
        b.outputs["y"] = ()
        read = "y = sum(d, r[d] * h[d])" if kind == "dot" else "y = sum(d, h[d]) / sqrt(D)"
    else:
        b.outputs["y"] = ("D",)
        read = {"copy": "y[d] = h[d]", "gate": "y[d] = r[d] * h[d]", "tanh": "y[d] = tanh(h[d])"}[kind]
    if kind in ("dot", "gate"):
        b.inp("r", "D")
    if kind == "tanh":
        b.features.add("tanh_readout")
    reads = [read]
    if rng.random() < 0.3:
        b.outputs["z"] = ()
        reads.append("z = sum(d, h[d])")
        b.features.add("two_readouts")
    before = n % 3 == 2
    b.features.add("readout_before" if before else "readout_after")
    b.lines[:] = reads + b.lines if before else b.lines + reads


SCALAR_DECAYS = ["input_plain", "none", "exp_scalar", "const", "const_exp", "size_expr", "sigmoid_scalar",
                 "softplus_param", "param_plain"]


def scalar_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """c = decay * c + injection (the constant injection `c = a * c + 1` among them)."""
    b.states["c"] = ()
    if decay == "size_expr":
        dec = decay_text(b, decay, {"key": ("d", "D")})
        inject = f"sum(d, {b.inp('x', 'D')}[d]) / D"
    else:
        dec = decay_text(b, decay, {})
        inject = ["1", "x", "x + 1"][n % 3]
        if inject != "1":
            b.inp("x")
    if inject == "1":
        b.features.add("const_injection")
    b.lines.append(f"c = {decayed(dec, 'c')} + {inject}")
    b.outputs["y"] = ()
    kind = rng.choice(["copy", "gate", "tanh", "sqrt"])
    if not b.inputs:
        kind = "gate"  # a recurrence needs an input (its batch and length come from one)
    read = {"copy": "y = c", "gate": "y = r * c", "tanh": "y = tanh(c)", "sqrt": "y = c / sqrt(2.0)"}[kind]
    if kind == "gate":
        b.inp("r")
    if kind == "tanh":
        b.features.add("tanh_readout")
    before = n % 2 == 1
    b.features.add("readout_before" if before else "readout_after")
    b.lines[:] = [read] + b.lines if before else b.lines + [read]


TWO_VARIANTS = ["S+z", "S+R", "S+c", "h+c", "h->c"]


def two_state_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """Two states in one recurrence, each with its own decay; outputs combine them."""
    variant = TWO_VARIANTS[n % len(TWO_VARIANTS)]
    b.features.add(f"two:{variant}")
    second = rng.choice(["none", "exp_scalar", "const", "sigmoid_scalar", "exp_key", "param_plain"])
    if variant.startswith("S"):
        b.states["S"] = ("K", "V")
        dec = decay_text(b, decay, {"key": ("i", "K"), "value": ("j", "V")})
        q, k, v = b.inp("q", "K"), b.inp("k", "K"), b.inp("v", "V")
        b.lines.append(f"S[i, j] = {decayed(dec, 'S[i, j]')} + {k}[i] * {v}[j]")
        read_s = f"sum(i, {q}[i] * S[i, j])"
        b.outputs["o"] = ("V",)
        if variant == "S+z":
            b.states["z"] = ("K",)
            dec2 = decay_text(b, second, {"key": ("i", "K")}, "2")
            b.lines.append(f"z[i] = {decayed(dec2, 'z[i]')} + {k}[i]")
            b.lines.append(f"o[j] = {read_s} + sum(i, {q}[i] * z[i])")
        elif variant == "S+R":
            b.states["R"] = ("K", "V")
            dec2 = decay_text(b, second, {"key": ("i", "K"), "value": ("j", "V")}, "2")
            b.lines.append(f"R[i, j] = {decayed(dec2, 'R[i, j]')} + {k}[i] * {b.inp('x', 'V')}[j]")
            b.lines.append(f"o[j] = K ** -0.5 * ({read_s} - 0.5 * sum(i, {q}[i] * R[i, j]))")
        else:
            b.states["c"] = ()
            dec2 = decay_text(b, second, {}, "2")
            b.lines.insert(0, f"c = {decayed(dec2, 'c')} + {b.inp('x')}")
            b.lines.append(f"o[j] = {read_s} * sigmoid(c)")
            b.outputs["e"] = ()
            b.lines.append("e = c")
    else:
        b.states["h"] = ("D",)
        b.states["c"] = ()
        dec = decay_text(b, decay, {"key": ("d", "D"), "value": ("d", "D")})
        dec2 = decay_text(b, second, {}, "2")
        x = b.inp("x", "D")
        b.lines.append(f"h[d] = {decayed(dec, 'h[d]')} + {x}[d]")
        if variant == "h+c":
            b.lines.append(f"c = {decayed(dec2, 'c')} + {b.inp('s')}")
        else:  # the scalar state reads the vector state (after its update): a coupled, block-triangular step
            b.lines.append(f"c = {decayed(dec2, 'c')} + sum(d, h[d]) / D")
        b.outputs["y"] = ("D",)
        b.lines.append("y[d] = h[d] + c")


PAIR_DECAYS = ["exp_key", "none", "exp_value", "exp_scalar"]


def pair_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """S[K, D, V] = decay * S + k[a] * u[b] * v[j], a 3-axis state read summed over its pair (a, b): chunked with
    the pair flattened into one key axis of size K * D (a decay along a is a decay along that key axis)."""
    b.states["S"] = ("K", "D", "V")
    dec = decay_text(b, decay, {"key": ("a", "K"), "value": ("j", "V")})
    k, u, v = b.inp("k", "K"), b.inp("u", "D"), b.inp("v", "V")
    update = f"S[a, b, j] = {decayed(dec, 'S[a, b, j]')} + {k}[a] * {u}[b] * {v}[j]"
    readout = f"sum(a, b, {b.inp('q', 'K')}[a] * {b.inp('r', 'D')}[b] * S[a, b, j])"
    if n % 2 == 1:
        readout = f"tanh({readout})"
        b.features.add("tanh_readout")
    b.outputs["o"] = ("V",)
    before = n % 3 == 2
    b.features.add("readout_before" if before else "readout_after")
    b.lines += [f"o[j] = {readout}", update] if before else [update, f"o[j] = {readout}"]


COUPLED_DECAYS = ["complement_sigmoid", "sigmoid_key", "exp_key", "const_exp"]


def coupled_program(b: Builder, n: int, decay: str, rng: random.Random) -> None:
    """A cascade of m = 2, 3 or 4 vector states: h1 = decay * h1 + x, then each h_r = d_r * h_r + (1 - d_r) * h_(r-1)
    (a smoothing of the state before it, read after its update), d_r a gate drawn per stage; for n = 3 the first
    state also reads the last one's previous value (the block fills in). Coupled-elementwise: one m x m block per
    element, whose scan form runs on both backends."""
    m = 2 + n % 3
    b.features.add(f"coupled:m{m}")
    axes = {"key": ("d", "D"), "value": ("d", "D")}
    for r in range(1, m + 1):
        b.states[f"h{r}"] = ("D",)
    first = f"{decayed(decay_text(b, decay, axes), 'h1[d]')} + {b.inp('x', 'D')}[d]"
    if n % 4 == 3:
        first += f" + 0.25 * h{m}[d]"
        b.features.add("coupled:feedback")
    b.lines.append(f"h1[d] = {first}")
    for r in range(2, m + 1):
        gate = decay_text(b, rng.choice(COUPLED_DECAYS), axes, str(r))
        b.lines.append(f"h{r}[d] = {gate} * h{r}[d] + (1 - {gate}) * h{r - 1}[d]")
    b.outputs["y"] = ("D",)
    b.lines.append(f"y[d] = h{m}[d] - 0.5 * h1[d]")


SHAPES = [  # (shape, builder, decay kinds cycled over, number of programs)
    ("matrix", matrix_program, DECAY_KINDS, 24),
    ("delta", delta_program, DELTA_DECAYS, 10),
    ("vector", vector_program, VECTOR_DECAYS, 11),
    ("scalar", scalar_program, SCALAR_DECAYS, 9),
    ("two", two_state_program, ["exp_key", "none", "const", "exp_scalar", "size_expr", "sigmoid_key",
                                "softplus_param", "exp_value", "const_exp", "input_plain"], 10),
    ("pair", pair_program, PAIR_DECAYS, 4),
    ("product", product_program, ["exp_scalar", "exp_key", "none", "const_exp"], 5),
    ("coupled", coupled_program, COUPLED_DECAYS, 4),  # last: the shared rng leaves the programs above as they were
]


@dataclass(frozen=True)
class Program:
    ident: str
    name: str
    text: str
    sizes: dict
    features: frozenset


def generate_programs(seed: int = SEED) -> list[Program]:
    rng = random.Random(seed)
    programs = []
    for shape, build, decays, count in SHAPES:
        for n in range(count):
            decay = decays[n % len(decays)]
            ident = f"{shape}{n:02d}-{decay}"
            b = Builder(f"{shape}_{n}")
            build(b, n, decay, rng)
            sizes = dict(zip(["K", "V", "D"], rng.sample([4, 5, 6, 7, 8], 3)))
            text = b.text()
            used = {s: v for s, v in sizes.items() if any(s in dims for dims in (
                *b.inputs.values(), *b.params.values(), *b.states.values(), *b.outputs.values()))}
            programs.append(Program(ident, b.name, text, used, frozenset(b.features | {f"shape:{shape}"})))
    return programs


PROGRAMS = generate_programs()
IDS = [p.ident for p in PROGRAMS]


def test_generator_covers_every_feature():
    """Every feature the breadth tests promise shows up in some generated program (and every program loads)."""
    seen = set().union(*(p.features for p in PROGRAMS))
    wanted = {f"shape:{s[0]}" for s in SHAPES} | {f"decay:{k}" for k in DECAY_KINDS} | {
        f"scale:{s}" for s in SCALES} | {f"beta:{b}" for b in BETAS} | {f"two:{v}" for v in TWO_VARIANTS} | {
        "const_key", "const_query", "const_injection", "readout_before", "readout_after", "two_readouts",
        "tanh_readout", "delta", "product:r2", "product:r3", "product:decay_alone", "decay:complement_sigmoid",
        "product:one_assignment", "coupled:m2", "coupled:m3", "coupled:m4", "coupled:feedback"}
    assert wanted <= seen, f"features no program has: {sorted(wanted - seen)}"
    texts = "\n".join(p.text for p in PROGRAMS)
    for snippet in ["/ sqrt(K)", "K ** -0.5", "sigmoid(2.0)", "exp(-1 / 8)", "(1 - 1 / K)", "0.9 *",
                    "exp(-softplus(A[i]) * dt)", "sigmoid(a[i])", "sigmoid(a)", "exp(g[i])", "exp(gv[j])",
                    "exp(g)", "+ 0.5 * k[i] * u[j]", "c = w * c + 1", "+ v[j]", "sum(i, S[i, j])",
                    "tanh(sum(i, q[i] * S[i, j]))"]:
        assert snippet in texts, f"no generated program contains {snippet!r}"
    assert 40 <= len(PROGRAMS) <= 80
    assert len(set(IDS)) == len(IDS)
    for p in PROGRAMS:
        rec = recurrence_dsl.load(p.text)[p.name]
        assert rec.checked.inputs, f"a program without inputs cannot be called:\n{p.text}"


def test_coupled_programs_are_scanned_as_blocks():
    """The cascades are coupled-elementwise with one m x m block, and the Triton backend scans them (m <= 4)."""
    from codegen.triton_recurrent import triton_form_names
    from recurrence_dsl.analysis import analyse

    coupled = [p for p in PROGRAMS if "shape:coupled" in p.features]
    assert coupled
    for p in coupled:
        analysis = analyse(recurrence_dsl.load(p.text)[p.name].checked)
        block = analysis.states["h1"].block
        assert analysis.cls.value == "coupled-elementwise" and block is not None, (analysis.unavailable, p.text)
        assert f"coupled:m{len(block.states)}" in p.features
        assert "scan" in triton_form_names(analysis), p.text


def test_pair_programs_get_the_flattened_chunked_form():
    """The 3-axis programs are chunked with their pair flattened, so the form tests below run that form."""
    from recurrence_dsl.analysis import analyse

    pairs = [p for p in PROGRAMS if "shape:pair" in p.features]
    assert pairs
    for p in pairs:
        analysis = analyse(recurrence_dsl.load(p.text)[p.name].checked)
        assert "chunked" in analysis.forms, (analysis.unavailable, p.text)
        assert analysis.chunk_analysis.states["S"].chunk.pair, p.text


def test_product_programs_get_the_rank_r_class():
    """Every DeltaProduct program, the state assigned r times or once, is a rank-r update with a chunked form."""
    from recurrence_dsl.analysis import TransitionClass, analyse

    products = [p for p in PROGRAMS if "shape:product" in p.features]
    assert any("product:one_assignment" in p.features for p in products)
    for p in products:
        analysis = analyse(recurrence_dsl.load(p.text)[p.name].checked)
        assert analysis.states["S"].cls is TransitionClass.RANK_R_UPDATE, p.text
        assert "chunked" in analysis.forms, (analysis.unavailable, p.text)


# ---------------------------------------------------------------------------------------------------------
# running a program
# ---------------------------------------------------------------------------------------------------------


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def cast_state(initial, dtype):
    if isinstance(initial, dict):
        return {k: v.to(dtype) for k, v in initial.items()}
    return None if initial is None else initial.to(dtype)


def case(program: Program, T: int, seed: int = 0):
    """Arguments and initial state (float32-representable values, kept in float64) and the reference on them."""
    rec = recurrence_dsl.load(program.text)[program.name]
    args, initial = sample_arguments(rec.checked, program.sizes, 1, T, 1, dtype=F64, seed=seed,
                                     with_initial_state=True)
    args = [a.to(F32).to(F64) for a in args]
    initial = cast_state(cast_state(initial, F32), F64)
    out, final = rec.reference(*args, initial_state=initial, output_final_state=True)
    ref = flatten(rec, out, final)
    for key, value in ref.items():  # the generator's promise: stable programs on stable inputs
        assert torch.isfinite(value).all() and value.abs().max() < 1e3, (
            f"{program.ident}: reference {key} is not small and finite (max |x| = {value.abs().max():.3g}); "
            f"the sampled inputs are outside the stable range\n{program.text}")
    return rec, args, initial, ref


def compare(rec, layer, form: str, args, initial, ref, dtype, **kwargs) -> str | None:
    """None when `layer(form=form)` matches the reference within TOL[dtype]; else what went wrong."""
    try:
        out, final = layer(*[a.to(dtype) for a in args], initial_state=cast_state(initial, dtype),
                           output_final_state=True, form=form, **kwargs)
        got = flatten(rec, out, final)
    except Exception as error:
        return f"raised {type(error).__name__}: {error}"
    if got.keys() != ref.keys():
        return f"returned {sorted(got)}, expected {sorted(ref)}"
    problems, errors = [], {}
    for key, value in ref.items():
        if got[key].shape != value.shape:
            problems.append(f"{key} has shape {tuple(got[key].shape)}, expected {tuple(value.shape)}")
        elif key.startswith("out:") and got[key].dtype != dtype:
            problems.append(f"{key} has dtype {got[key].dtype}")
        elif not torch.isfinite(got[key]).all():
            problems.append(f"{key} has inf/nan")
        else:
            errors[key] = rel(got[key], value)
    bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= TOL[dtype]}
    if bad:
        problems.append(f"relative errors {bad} > {TOL[dtype]:.0e}")
    return "; ".join(problems) or None


def report(program: Program, failures: list[tuple[str, str]]) -> str:
    """The failing cases of one program, those with the same problem on one line, and the program text."""
    by_problem: dict[str, list[str]] = {}
    for where, problem in failures:
        by_problem.setdefault(problem, []).append(where)
    sizes = ", ".join(f"{k}={v}" for k, v in program.sizes.items())
    lines = [f"[{', '.join(wheres)}] {problem}" for problem, wheres in by_problem.items()]
    return (f"{program.ident} ({sizes}, B=1, H=1) failed {len(failures)} case(s):\n  " + "\n  ".join(lines)
            + "\nprogram:\n" + program.text)


@pytest.mark.parametrize("program", PROGRAMS, ids=IDS)
def test_torch_forms(program):
    """Every torch form of the program, float64 and float32, T = 5 and 19, matches the float64 reference."""
    failures = []
    for T in LENGTHS:
        rec, args, initial, ref = case(program, T)
        try:
            layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=TORCH_CHUNK, tuning=False)
        except Exception as error:
            pytest.fail(report(program, [("compile(backend='torch')", f"raised {type(error).__name__}: {error}")]))
        assert "recurrent" in layer.forms, report(program, [("torch", f"forms {list(layer.forms)} lack 'recurrent'")])
        for form in layer.forms:
            for dtype in (F64, F32):
                problem = compare(rec, layer, form, args, initial, ref, dtype)
                if problem:
                    failures.append((f"torch/{form} {str(dtype)[6:]} T={T}", problem))
    assert not failures, report(program, failures)


@pytest.mark.parametrize("program", PROGRAMS, ids=IDS)
def test_triton_forms(program):
    """Every Triton form of the program (recurrent, and scan, chunked and parallel where offered), float32, T = 5
    and 19, chunk 16."""
    failures = []
    for T in TRITON_LENGTHS:
        rec, args, initial, ref = case(program, T)
        try:
            layer = recurrence_dsl.compile(rec, backend="triton", chunk_size=TRITON_CHUNK, tuning=False)
            forms = list(layer.triton_forms)
        except Exception as error:
            pytest.fail(report(program, [("compile(backend='triton').triton_forms",
                                          f"raised {type(error).__name__}: {error}")]))
        expected = ["recurrent"] + [f for f in ("scan", "chunked", "parallel") if f in layer.forms]
        if forms != expected:
            failures.append(("triton_forms", f"forms {forms}, expected {expected}"))
        for form in forms:
            problem = compare(rec, layer, form, args, initial, ref, F32)
            if problem:
                failures.append((f"triton/{form} float32 T={T}", problem))
    assert not failures, report(program, failures)


def _pick(*features: str) -> Program:
    return next(p for p in PROGRAMS if set(features) <= p.features)


CLI_PROGRAMS = [_pick("shape:matrix", "decay:exp_key"), _pick("shape:delta", "decay:exp_scalar"),
                _pick("shape:two", "two:S+z")]


@pytest.mark.parametrize("program", CLI_PROGRAMS, ids=[p.ident for p in CLI_PROGRAMS])
def test_recdsl_check_passes(program, tmp_path, capsys):
    """`recdsl check` (reference, every torch form and the Triton rows) exits 0 on generated programs."""
    path = tmp_path / f"{program.name}.rec"
    path.write_text(program.text)
    shape = ",".join(["B=1", "T=19", "H=1"] + [f"{k}={v}" for k, v in program.sizes.items()])
    code = recdsl_main(["check", str(path), "--shape", shape])
    printed = capsys.readouterr()
    assert code == 0, f"recdsl check exited {code}\n{printed.out}{printed.err}\nprogram:\n{program.text}"
    rec = recurrence_dsl.load(program.text)[program.name]
    layer = recurrence_dsl.compile(rec, tuning=False)  # every Triton form is a row too (parallel among them)
    ran = [f"torch/{form}" for form in layer.forms] + [f"triton/{form}" for form in layer.triton_forms or ()]
    missing = [path for path in ran if path not in printed.out]
    assert not missing, f"recdsl check printed no row for {missing}:\n{printed.out}\nprogram:\n{program.text}"
