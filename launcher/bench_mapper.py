"""Mapper cost, side by side from one run: `python -m launcher.bench_mapper [--batch 64] [--width 768] ...`.

Rows, all on the same machine and inputs:
- `moe`: DeepSpeed MoE mapper (E experts, top-k) — train step (fwd+bwd) and eval forward;
- `dense`: the same blocks with the k experts always active and no router/dispatch
  (equal *active* parameters per sample);
- `folded`: the exact dense inference mapper from `fold_mapper` — eval forward.
Ratios are against `moe` in the same run. Defaults are GPT-2-sized (D=768, P=10, CLIP 512).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from vlpdist.config import ModelConfig
from vlpdist.models.experts import MultiBranchLinearExpert
from vlpdist.models.fold import fold_mapper
from vlpdist.models.mapper import build_mapper


class DenseEqualActiveMapper(nn.Module):
    """Baseline: per block, `k` multi-branch linear experts always summed (weights 1/k), no routing."""

    def __init__(self, cfg: ModelConfig, clip_dim: int, width: int):
        super().__init__()
        self.prefix_length, self.width = cfg.prefix_length, width
        self.input_proj = nn.Linear(clip_dim, cfg.prefix_length * width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(cfg.mapper_depth))
        self.experts = nn.ModuleList(
            nn.ModuleList(MultiBranchLinearExpert(cfg.prefix_length, width, list(cfg.kernel_sizes)) for _ in range(cfg.top_k))
            for _ in range(cfg.mapper_depth)
        )

    def forward(self, clip_BC: torch.Tensor):
        batch = clip_BC.shape[0]
        h_BPD = self.input_proj(clip_BC).view(batch, self.prefix_length, self.width)
        for norm, experts in zip(self.norms, self.experts):
            x_BF = norm(h_BPD).reshape(batch, -1)
            mixed_BF = sum(expert(x_BF) for expert in experts) / len(experts)
            h_BPD = h_BPD + F.gelu(mixed_BF.view_as(h_BPD))
        return h_BPD, h_BPD.new_zeros(()), h_BPD.new_zeros(0)


def count_active_parameters(module: nn.Module, top_k: int, num_experts: int) -> int:
    """Parameters one sample touches: expert params scaled by k/E, everything else in full."""
    total = 0
    for name, param in module.named_parameters():
        total += param.numel() * top_k // num_experts if ".deepspeed_experts." in name else param.numel()
    return total


def interleaved_median_seconds(steps: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each step, the steps run round-robin so that load from other processes hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(cfg: ModelConfig, clip_dim: int, width: int, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    clip_BC = torch.randn(batch, clip_dim)
    moe = build_mapper(cfg, clip_dim, width)
    dense = DenseEqualActiveMapper(cfg, clip_dim, width)
    folded = fold_mapper(moe)

    def train_step(mapper):
        def step():
            mapper.train()
            prefix, aux, _ = mapper(clip_BC)
            (prefix.square().mean() + aux).backward()

        return step

    def eval_step(mapper):
        def step():
            mapper.eval()
            with torch.no_grad():
                mapper(clip_BC)

        return step

    train = interleaved_median_seconds({"moe": train_step(moe), "dense": train_step(dense)}, repeats)
    evals = interleaved_median_seconds({"moe": eval_step(moe), "dense": eval_step(dense), "folded": eval_step(folded)}, repeats)
    return [
        {"mapper": "moe", "active_params": count_active_parameters(moe, cfg.top_k, cfg.num_experts), "train_s": train["moe"], "eval_s": evals["moe"]},
        {"mapper": "dense", "active_params": count_active_parameters(dense, 1, 1), "train_s": train["dense"], "eval_s": evals["dense"]},
        {"mapper": "folded", "active_params": None, "train_s": None, "eval_s": evals["folded"]},
    ]


def print_table(rows: list[dict], title: str) -> None:
    base = rows[0]
    print(f"\n{title}")
    print(f"{'mapper':8} {'active params':>14} {'train ms':>10} {'x moe':>7} {'eval ms':>10} {'x moe':>7}")
    for row in rows:
        params = f"{row['active_params']:,}" if row["active_params"] else "-"
        train = f"{1e3 * row['train_s']:.2f}" if row["train_s"] else "-"
        train_ratio = f"{row['train_s'] / base['train_s']:.2f}" if row["train_s"] else "-"
        print(f"{row['mapper']:8} {params:>14} {train:>10} {train_ratio:>7} {1e3 * row['eval_s']:>10.2f} {row['eval_s'] / base['eval_s']:>7.2f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.bench_mapper", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--width", type=int, default=768, help="LM width D (GPT-2: 768)")
    parser.add_argument("--clip-dim", type=int, default=512)
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, fp32")
    results = {}
    for top_k in args.top_k:
        cfg = ModelConfig(prefix_length=args.prefix_length, mapper_depth=args.depth, num_experts=args.experts,
                          top_k=top_k, kernel_sizes=args.kernel_sizes)
        for batch in args.batch:
            rows = bench(cfg, args.clip_dim, args.width, batch, args.repeats)
            print_table(rows, f"E={args.experts} k={top_k} P={args.prefix_length} D={args.width} depth={args.depth} batch={batch}")
            results[(top_k, batch)] = rows
    return results


if __name__ == "__main__":
    main()
