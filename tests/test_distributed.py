"""Context parallelism (issue 13): `recurrence_dsl.distributed.context_parallel` on gloo, 2 and 4 processes.

Each test spawns its processes on localhost (torch.multiprocessing, a free port) and every process runs every
case: the same seeded full-length inputs on every rank, each rank passing its own slice (uneven lengths) to the
context-parallel layer, against the single-process layer on the whole sequence. Compared within a relative 1e-5
(float32, `||x - ref|| / ||ref||`): the outputs, the final states, and the gradients of every input, param and
the initial state, for the identity (linear_attention), scalar (retention), key-decay (gla) and rank-one delta
(delta_net) classes and the relay path (indrnn, non-linear; recurrences with shift states), with an initial state,
with and without packed sequences (`cu_seqlens`) crossing ranks (one spanning a whole rank, one empty).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

import recurrence_dsl
from recurrence_dsl.errors import CallError

SPECS = Path(__file__).resolve().parent.parent / "specs"
CASES = ["linear_attention", "retention", "gla", "delta_net", "indrnn"]
# On 2 ranks also: two states (a dict of initial states), an elementwise decay (Mamba: scan form), and the
# delta rule written in the papers' S[V, K] layout (its transition mixes the state's second axis), and DeltaProduct
# (a rank-r update: its slice transition is a K x K matrix as the delta rule's).
EXTRA_CASES = ["normalized_linear_attention", "mamba", "delta_net_vk", "delta_product"]
# And recurrences with shift states (tests/data/token_shift.rec: RWKV's token shift before linear attention, a
# width-3 convolution's window before GLA), which take the relay path: the shift states' values at a rank boundary
# are the previous rank's last ones, handed on with the other states.
SHIFT_CASES = ["token_shift_la", "conv_gla"]
TOKEN_SHIFT = Path(__file__).resolve().parent / "data" / "token_shift.rec"
DELTA_NET_VK = """recurrence delta_net_vk(q[K], k[K], v[V], beta) -> o[V] {
    state S[V, K]
    u[i] = v[i] - sum(j, S[i, j] * k[j])
    S[i, j] = S[i, j] + beta * u[i] * k[j]
    o[i] = sum(j, S[i, j] * q[j])
}
"""
LENGTHS = {2: [13, 19], 4: [5, 9, 7, 11]}  # slice lengths per rank: uneven, 32 steps in all
# Packed sequences over the 32 steps: [0, 3), [3, 17) (on 4 ranks it spans rank 1 whole), an empty one, [17, 30).
CU = [0, 3, 17, 17, 30, 32]
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _case(name: str, rank: int, world: int, packed: bool, final: bool = True) -> dict[str, float]:
    """One case on this rank: the relative error of every compared tensor."""
    import torch.distributed as dist

    from recurrence_dsl.distributed import context_parallel
    from recurrence_dsl.sampling import sample_arguments

    source = {"delta_net_vk": DELTA_NET_VK}.get(name, TOKEN_SHIFT if name in SHIFT_CASES else SPECS / f"{name}.rec")
    rec = recurrence_dsl.load(source)[name]
    layer = recurrence_dsl.compile(rec, backend="torch", chunk_size=4, tuning=False)
    # The chunked form wherever there is one (auto would step through pieces of 16 steps or fewer).
    layer = layer.options(form="chunked" if "chunked" in layer.forms else "auto")
    sizes = {s: 8 for s in rec.checked.sizes}
    total, batch = 32, (1 if packed else 2)
    rows = len(CU) - 1 if packed else batch
    args, s0 = sample_arguments(rec.checked, sizes, batch, total, 2, dtype=torch.float32, seed=7,
                                with_initial_state=True, rows=rows)
    s0 = s0 if isinstance(s0, dict) else {rec.checked.states[0].name: s0}
    n_in = len(rec.checked.inputs)
    gen = torch.Generator().manual_seed(11)
    cu = torch.tensor(CU) if packed else None

    # The single-process layer on the whole sequence: loss = <outputs, w> + <final state, wf>.
    full = [a.detach().clone().requires_grad_(True) for a in args]
    init = {k: v.detach().clone().requires_grad_(True) for k, v in s0.items()}
    states = list(init)
    arg0 = init[states[0]] if len(states) == 1 else init
    out, fin = layer(*full, initial_state=arg0, output_final_state=True, cu_seqlens=cu)
    out = out[0] if isinstance(out, tuple) else out
    fin = fin if isinstance(fin, dict) else {states[0]: fin}
    w = torch.randn(out.shape, generator=gen)
    wf = {k: torch.randn(v.shape, generator=gen) for k, v in fin.items()}
    loss = (out * w).sum() + (sum((fin[k] * wf[k]).sum() for k in fin) if final else 0)
    loss.backward()

    # Context parallel: this rank's slice; the final state's term split over the ranks.
    lengths = LENGTHS[world]
    lo = sum(lengths[:rank])
    hi = lo + lengths[rank]
    cp = context_parallel(layer)
    local = [(a[:, lo:hi] if i < n_in else a).detach().clone().requires_grad_(True) for i, a in enumerate(args)]
    given = {k: v.detach().clone().requires_grad_(True) for k, v in s0.items()} if rank == 0 else None
    arg0 = None if given is None else (given[states[0]] if len(states) == 1 else given)
    out_cp, fin_cp = cp(*local, initial_state=arg0, output_final_state=final, cu_seqlens=cu)
    out_cp = out_cp[0] if isinstance(out_cp, tuple) else out_cp
    if not final:  # without output_final_state: no final state, and gradients from the outputs alone
        assert fin_cp is None
        fin_cp, fin = {}, {}
    fin_cp = fin_cp if isinstance(fin_cp, dict) else {states[0]: fin_cp}
    loss_cp = (out_cp * w[:, lo:hi]).sum() + sum((fin_cp[k] * wf[k]).sum() for k in fin_cp) / world
    loss_cp.backward()

    errors = {"output": _rel(out_cp, out[:, lo:hi])}
    errors.update({f"final {k}": _rel(fin_cp[k], fin[k]) for k in fin})
    for i, (a, b) in enumerate(zip(local, full)):
        ref = b.grad[:, lo:hi] if i < n_in else b.grad
        errors[f"grad {'input' if i < n_in else 'param'} {i}"] = _rel(a.grad, ref)
    if given is not None:
        errors.update({f"grad initial {k}": _rel(given[k].grad, init[k].grad) for k in given})
    assert cp.sent_bytes["forward"] > 0 and cp.sent_bytes["backward"] > 0, cp.sent_bytes
    dist.barrier()
    return errors


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name in CASES + (EXTRA_CASES + SHIFT_CASES if world == 2 else []):
            for packed in (False, True):
                results[f"{name}{' cu_seqlens' if packed else ''}"] = _case(name, rank, world, packed)
        if world == 2:
            for packed in (False, True):
                results[f"gla no final state{' cu_seqlens' if packed else ''}"] = _case("gla", rank, 2, packed, False)
        results["errors"] = _bad_calls(rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _bad_calls(rank: int, world: int) -> list[str]:
    """Bad calls raise CallError on the rank that made them, before any collective (so nothing hangs)."""
    from recurrence_dsl.distributed import context_parallel

    rec = recurrence_dsl.load(SPECS / "retention.rec")["retention"]
    cp = context_parallel(recurrence_dsl.compile(rec, backend="torch", tuning=False))
    q = torch.randn(1, 4, 2, 8)
    gamma = torch.full((2,), 0.9)
    messages = []
    if rank == 1:
        try:
            cp(q, q, q, gamma, initial_state=torch.zeros(1, 2, 8, 8))
        except CallError as err:
            messages.append(str(err))
    try:
        cp(q, q, q[..., :4].unsqueeze(-1), gamma)
    except CallError as err:
        messages.append(str(err))
    try:
        cp(q, q, q, gamma, reverse=True)
    except CallError as err:
        messages.append(str(err))
    return messages


def _spawn(world: int, tmp_path) -> dict:
    os.environ.setdefault("RECURRENCE_DSL_TUNING", "0")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}


def _check(results: dict) -> None:
    worst = {}
    for rank, cases in results.items():
        for case, errors in cases.items():
            if case == "errors":
                continue
            for what, err in errors.items():
                assert err < TOL, f"rank {rank}, {case}: {what} off by {err:.2e} (relative)"
                worst[case] = max(worst.get(case, 0.0), err)
    print("worst relative error per case:", {k: f"{v:.1e}" for k, v in worst.items()})
    # Every case compared at least the outputs and the gradient of every input (and final states where asked).
    assert all(len(errors) >= 3 for cases in results.values() for c, errors in cases.items() if c != "errors")


def test_two_ranks_match_single_process(tmp_path):
    results = _spawn(2, tmp_path)
    _check(results)
    assert len(results[0]) == 2 * (len(CASES) + len(EXTRA_CASES) + len(SHIFT_CASES)) + 3
    # the shift states' final states and the gradients of their initial states were compared
    assert {"final k1", "final k2", "grad initial k1", "grad initial k2", "grad param 4"} <= set(results[0]["conv_gla"])
    assert {"final klast", "grad initial klast"} <= set(results[0]["token_shift_la cu_seqlens"])
    # Rank 1 passed an initial state: refused; every rank passed a bad v: refused, naming it.
    assert any("initial_state is given on rank 0 only" in m for m in results[1]["errors"])
    assert any("input 'v'" in m for m in results[0]["errors"])
    assert all(any("forward recurrences only" in m for m in r["errors"]) for r in results.values())


def test_four_ranks_match_single_process(tmp_path):
    _check(_spawn(4, tmp_path))


def test_summary_sizes_and_paths():
    """The transition summary each class gathers, and which classes take the relay path."""
    from recurrence_dsl.distributed import context_parallel, summary_elements

    want = {"linear_attention": (0, "all_gather"), "retention": (1, "all_gather"), "gla": (8, "all_gather"),
            "delta_net": (64, "all_gather"), "delta_product": (64, "all_gather"), "mamba": (64, "all_gather"),
            "indrnn": (None, "relay"), "token_shift_la": (None, "relay"), "conv_gla": (None, "relay")}
    for name, (elements, path) in want.items():
        rec = recurrence_dsl.load(TOKEN_SHIFT if name in SHIFT_CASES else SPECS / f"{name}.rec")[name]
        cp = context_parallel(recurrence_dsl.compile(rec, backend="torch", tuning=False))
        assert cp.path == path, name
        if elements is not None:
            (kind,) = cp.kinds.values()
            assert summary_elements(kind, (8, 8)) == elements, name


def test_probe_reads_the_transition_back():
    """M read off probe rows by linearity, for a matrix transition whose other axis is narrower than the mixed
    one (3 probe blocks for D = 8 over 3 columns), on either axis, and for a key-axis (diagonal-row) decay."""
    from recurrence_dsl.distributed import _apply, _Kind, _probe_count, _probe_state, _read_m

    gen = torch.Generator().manual_seed(3)
    for axis, dims in ((0, (8, 3)), (1, (3, 8)), (0, (8,))):
        kind = _Kind("matrix", axis=axis)
        p = torch.randn(2, 2, 8, 8, generator=gen, dtype=torch.float64)
        f = torch.randn((2, 2) + dims, generator=gen, dtype=torch.float64)  # the slice's own state
        count = _probe_count(kind, dims)
        assert count == (8 if dims == (8,) else 3)
        probed = [_apply(kind, p, _probe_state(kind, j, 2, 2, dims, torch.float64, "cpu")) + f for j in range(count)]
        assert torch.allclose(_read_m(kind, f, probed, dims), p, rtol=0, atol=1e-12), (axis, dims)
    kind = _Kind("diagonal", axes=(0,))
    a = torch.rand(2, 2, 8, 1, generator=gen, dtype=torch.float64)
    f = torch.randn(2, 2, 8, 5, generator=gen, dtype=torch.float64)
    probed = [_apply(kind, a, _probe_state(kind, 0, 2, 2, (8, 5), torch.float64, "cpu")) + f]
    assert torch.allclose(_read_m(kind, f, probed, (8, 5)), a, rtol=0, atol=1e-12)


def test_refusals_need_no_process_group():
    """What context_parallel refuses before any collective: an unknown layer, a forced path a class lacks, an
    unknown path, and a call without an initialised process group."""
    import pytest

    from recurrence_dsl.analysis import analyse
    from recurrence_dsl.distributed import context_parallel

    rec = recurrence_dsl.load(SPECS / "indrnn.rec")["indrnn"]
    layer = recurrence_dsl.compile(rec, backend="torch", tuning=False)
    with pytest.raises(ValueError, match="no associative summary"):
        context_parallel(layer, path="all_gather")
    with pytest.raises(ValueError, match="path must be"):
        context_parallel(layer, path="ring")
    shifted = recurrence_dsl.load(TOKEN_SHIFT)["conv_gla"]
    with pytest.raises(ValueError, match=r"^conv_gla has shift states \(k1, k2\), computed by shifting along T, which "
                                         r"the all_gather path does not summarise: .* use path='relay'"):
        context_parallel(shifted, path="all_gather")

    class Imported:  # a layer this process did not generate (say, imported from a module file)
        recurrence = layer.recurrence.__class__(**{**layer.recurrence.__dict__, "spec_hash": "0" * 16})
        name = "indrnn"

    with pytest.raises(ValueError, match="needs the analysis"):
        context_parallel(Imported())
    assert context_parallel(Imported(), analysis=analyse(rec.checked)).path == "relay"
    cp = context_parallel(rec)  # a Recurrence is compiled here
    with pytest.raises(CallError, match="torch.distributed initialised"):
        cp(torch.randn(1, 4, 2, 8), torch.zeros(2, 8))
