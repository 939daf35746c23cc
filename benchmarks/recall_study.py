"""Associative recall on CPU: generated GLA + DeltaNet layers against softmax attention, with and without a token shift.

Prints a table and writes benchmarks/results/recall_study.json. See tests/test_training.py for the CI version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import recurrence_dsl  # noqa: E402


@dataclass
class Task:
    """Sequences of `pairs` (key, value) tokens, interleaved k1 v1 k2 v2 ..., then `queries` keys from them; the
    target at each query is its value. Keys are tokens [0, keys), values [keys, keys + values)."""

    keys: int = 16
    values: int = 16
    pairs: int = 8
    queries: int = 8

    @property
    def length(self) -> int:
        return 2 * self.pairs + self.queries

    @property
    def vocab(self) -> int:
        return self.keys + self.values

    def __post_init__(self):
        if self.pairs > self.keys:
            raise ValueError(f"Task: {self.pairs} pairs need at least as many distinct keys, got keys={self.keys}")

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [size, length], targets [size, length] with -100 where no target)."""
        keys = torch.stack([torch.randperm(self.keys, generator=generator)[: self.pairs] for _ in range(size)])
        values = torch.randint(self.keys, self.vocab, (size, self.pairs), generator=generator)
        which = torch.randint(0, self.pairs, (size, self.queries), generator=generator)
        tokens = torch.empty(size, self.length, dtype=torch.long)
        tokens[:, 0 : 2 * self.pairs : 2] = keys
        tokens[:, 1 : 2 * self.pairs : 2] = values
        tokens[:, 2 * self.pairs :] = keys.gather(1, which)
        targets = torch.full_like(tokens, -100)
        targets[:, 2 * self.pairs :] = values.gather(1, which)
        return tokens, targets


class RecurrentMixer(nn.Module):
    """A generated GLA or DeltaNet layer with its projections (heads of size `head_dim`)."""

    def __init__(self, kind: str, dim: int, heads: int, layer):
        super().__init__()
        self.kind, self.heads, self.head_dim = kind, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.gate = nn.Linear(dim, dim if kind == "gla" else heads)
        self.out = nn.Linear(dim, dim, bias=False)
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).unbind(2)
        if self.kind == "gla":
            g = F.logsigmoid(self.gate(x)).view(B, T, self.heads, self.head_dim) / 16
            o, _ = self.layer(q, k, v, g)
        else:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            beta = torch.sigmoid(self.gate(x))
            o, _ = self.layer(q, k, v, beta)
        return self.out(o.reshape(B, T, -1))


class SoftmaxMixer(nn.Module):
    """Causal softmax attention, no positional encoding (the same inputs as the recurrent mixers)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


class RecallModel(nn.Module):
    """Embedding, an optional token shift (each position also sees the previous token), two mixer blocks, a head."""

    def __init__(self, vocab: int, dim: int, mixers: list[nn.Module], token_shift: bool):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.token_shift = nn.Linear(2 * dim, dim) if token_shift else None
        self.mixers = nn.ModuleList(mixers)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in mixers)
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                nn.Linear(2 * dim, dim)) for _ in mixers)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.token_shift is not None:
            x = self.token_shift(torch.cat([x, F.pad(x, (0, 0, 1, -1))], dim=-1))
        for mixer, norm, mlp in zip(self.mixers, self.norms, self.mlps):
            x = x + mixer(norm(x))
            x = x + mlp(x)
        return self.head(x)


def build(mixer: str, task: Task, dim: int, heads: int, token_shift: bool, backend: str = "torch") -> RecallModel:
    if mixer == "softmax":
        mixers = [SoftmaxMixer(dim, heads), SoftmaxMixer(dim, heads)]
    else:
        gla = recurrence_dsl.compile(recurrence_dsl.load(ROOT / "specs" / "gla.rec")["gla"], backend=backend)
        delta = recurrence_dsl.compile(recurrence_dsl.load(ROOT / "specs" / "delta_net.rec")["delta_net"],
                                       backend=backend)
        mixers = [RecurrentMixer("gla", dim, heads, gla), RecurrentMixer("delta", dim, heads, delta)]
    return RecallModel(task.vocab, dim, mixers, token_shift)


def accuracy(model: nn.Module, task: Task, generator: torch.Generator, size: int = 512) -> float:
    tokens, targets = task.batch(size, generator)
    with torch.no_grad():
        predicted = model(tokens).argmax(-1)
    mask = targets != -100
    return (predicted[mask] == targets[mask]).float().mean().item()


def train(model: nn.Module, task: Task, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> dict:
    """Adam with a linear warmup and cosine decay; returns losses, the held-out accuracy and the time taken."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        tokens, targets = task.batch(batch, generator)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": seconds,
            "accuracy": accuracy(model, task, torch.Generator().manual_seed(seed + 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--mixers", nargs="+", choices=("recurrent", "softmax"), default=["recurrent", "softmax"])
    parser.add_argument("--token-shift", choices=("both", "on", "off"), default="both")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "recall_study.json"))
    args = parser.parse_args()
    rows = []
    for pairs in args.pairs:
        task = Task(keys=max(16, pairs), pairs=pairs, queries=pairs)
        for mixer in args.mixers:
            for shift in {"both": (False, True), "on": (True,), "off": (False,)}[args.token_shift]:
                torch.manual_seed(0)
                model = build(mixer, task, args.dim, args.heads, shift)
                result = train(model, task, args.steps)
                row = {"T": task.length, "pairs": pairs, "mixer": "gla+delta_net" if mixer == "recurrent" else mixer,
                       "token_shift": shift, "dim": args.dim, "heads": args.heads, "steps": args.steps, **result}
                rows.append(row)
                print(f"T={row['T']:4d} {row['mixer']:14s} shift={shift!s:5s} loss {row['first_loss']:.2f} -> "
                      f"{row['last_loss']:.2f}  accuracy {row['accuracy']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "steps": args.steps, "dim": args.dim, "heads": args.heads, "values": 16, "chance_accuracy": 1 / 16}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows already in the file stay unless this run repeats their configuration (a long study can be done one
    # configuration at a time). Rows written before rows carried dim/heads/steps take them from that file's meta.
    keep = []
    if out.exists():
        old = json.loads(out.read_text())
        done = {_row_key(row) for row in rows}
        for r in old["rows"]:
            for field in ("dim", "heads", "steps"):
                if field not in r:
                    r[field] = old["meta"][field]
            if _row_key(r) not in done:
                keep.append(r)
    for field in ("dim", "heads", "steps"):
        meta.pop(field)  # per row now: the file mixes runs of several widths
    rows = sorted(keep + rows, key=lambda r: (r["T"], r["dim"], r["mixer"], r["token_shift"]))
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _row_key(row: dict) -> tuple:
    return row["T"], row["mixer"], row["token_shift"], row["dim"], row["heads"], row["steps"]


if __name__ == "__main__":
    main()
