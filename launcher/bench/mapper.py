"""Mapper cost, side by side from one run: `python -m launcher.bench.mapper [--batch 1 64 1024] [--quick] ...`.

Rows per batch size, all on the same machine, weights and inputs, timed round-robin:
- `moe`: DeepSpeed MoE mapper (E experts, top-k) — train step (fwd+bwd) and eval forward;
- `dense`: the same blocks with the k experts always active and no router/dispatch
  (equal *active* parameters per sample);
- `folded`: the exact dense inference mapper from `fold_mapper`, on the path its rule picks
  (named in brackets), then `folded-<path>` with each exact path forced — eval forward;
- `static`: `fold_mapper_static` (gates fixed to their calibration mean; approximate) — eval forward.
Ratios are against `moe` in the same run. Parameters: `stored` is what the mapper holds, `per sample`
what one sample's forward reads (k of the E experts). The static fold's error against the exact fold
is measured on held-out inputs. Weights are the init plus 0.02 N(0, 1), away from the identity-like
init as after training; inputs are unit-norm like CLIP embeddings. Defaults are GPT-2-sized
(D=768, P=10, CLIP 512, E=8, k=2, depth 2); `--quick` is a small geometry that runs in seconds.
`run_benchmark(...)` returns the same numbers as a JSON-ready dict for a benchmark suite.
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
from vlpdist.models.fold import (
    count_folded_parameters,
    fold_mapper,
    fold_mapper_static,
    grouped_gemm_available,
    measure_static_fold_error,
    plan_folded_evaluation,
)
from vlpdist.models.mapper import build_mapper

QUICK_GEOMETRY = {"width": 64, "clip_dim": 32, "prefix_length": 4, "repeats": 3}


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


def interleaved_median_seconds(steps: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
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


def unit_norm_clip(samples: int, clip_dim: int, seed: int) -> torch.Tensor:
    """(N, C) stand-ins for CLIP image embeddings, which are unit-norm."""
    return F.normalize(torch.randn(samples, clip_dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def train_step(mapper: nn.Module, clip_BC: torch.Tensor):
    def step():
        mapper.train()
        prefix, aux, _ = mapper(clip_BC)
        (prefix.square().mean() + aux).backward()

    return step


def eval_step(mapper: nn.Module, clip_BC: torch.Tensor, **forward_kwargs):
    def step():
        mapper.eval()
        with torch.no_grad():
            mapper(clip_BC, **forward_kwargs)

    return step


def run_benchmark(
    batches: tuple[int, ...] = (1, 64, 1024),
    *,
    width: int = 768,
    clip_dim: int = 512,
    prefix_length: int = 10,
    depth: int = 2,
    experts: int = 8,
    top_k: int = 2,
    kernel_sizes: tuple[int, ...] = (3, 5),
    repeats: int = 5,
    train_max_batch: int = 64,
    calibration_samples: int = 2048,
    seed: int = 0,
) -> dict:
    """Time every mapper row at each batch size (eval; train for moe/dense up to `train_max_batch`),
    count parameters, and measure the static fold's error; returns a JSON-ready dict."""
    torch.manual_seed(seed)
    cfg = ModelConfig(prefix_length=prefix_length, mapper_depth=depth, num_experts=experts, top_k=top_k,
                      kernel_sizes=list(kernel_sizes))
    moe = build_mapper(cfg, clip_dim, width)
    with torch.no_grad():
        for param in moe.parameters():
            param.add_(0.02 * torch.randn_like(param))
    dense = DenseEqualActiveMapper(cfg, clip_dim, width)
    folded = fold_mapper(moe.eval())
    static = fold_mapper_static(folded, unit_norm_clip(calibration_samples, clip_dim, seed + 1))
    static_error = measure_static_fold_error(folded, static, unit_norm_clip(512, clip_dim, seed + 2))
    grouped_gemm = grouped_gemm_available(torch.device("cpu"), torch.float32)
    paths = ["mixed", "grouped", "tiled"] if grouped_gemm else ["mixed", "tiled"]
    params = {
        "moe": {"stored": sum(p.numel() for p in moe.parameters()), "per_sample": count_active_parameters(moe, top_k, experts)},
        "dense": {"stored": sum(p.numel() for p in dense.parameters())} | {"per_sample": sum(p.numel() for p in dense.parameters())},
        "folded": count_folded_parameters(folded),
        "static": count_folded_parameters(static),
    }
    results = []
    for batch in batches:
        clip_BC = unit_norm_clip(batch, clip_dim, seed + 3)
        shape = dict(experts=experts, top_k=top_k, prefix=prefix_length, width=width, grouped_gemm=grouped_gemm)
        plans = {path: plan_folded_evaluation(batch, **shape, path=path) for path in paths}
        chosen = plan_folded_evaluation(batch, **shape)
        evals = {"moe": eval_step(moe, clip_BC), "dense": eval_step(dense, clip_BC), "folded": eval_step(folded, clip_BC)}
        evals |= {f"folded-{path}": eval_step(folded, clip_BC, path=path) for path in paths}
        evals["static"] = eval_step(static, clip_BC)
        eval_s = interleaved_median_seconds(evals, repeats)
        train_s = {}
        if batch <= train_max_batch:
            train_s = interleaved_median_seconds({"moe": train_step(moe, clip_BC), "dense": train_step(dense, clip_BC)}, repeats)
        rows = []
        for name, seconds in eval_s.items():
            kind = name.split("-")[0]
            path = chosen if name == "folded" else plans.get(name.removeprefix("folded-"))
            rows.append({
                "mapper": name,
                "path": None if path is None else {"path": path.path, "pairs_per_tile": path.pairs_per_tile},
                "params_stored": params[kind]["stored"],
                "params_per_sample": params[kind]["per_sample"],
                "train_ms": 1e3 * train_s[name] if name in train_s else None,
                "train_x_moe": train_s[name] / train_s["moe"] if name in train_s else None,
                "eval_ms": 1e3 * seconds,
                "eval_x_moe": seconds / eval_s["moe"],
            })
        results.append({"batch": batch, "rows": rows})
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
        "geometry": {"width": width, "clip_dim": clip_dim, "prefix_length": prefix_length, "depth": depth,
                     "experts": experts, "top_k": top_k, "kernel_sizes": list(kernel_sizes)},
        "static_fold_error": static_error,
        "results": results,
    }


def describe_path(row: dict) -> str:
    if row["path"] is None:
        return row["mapper"]
    path = row["path"]
    tiles = f"/{path['pairs_per_tile']}" if path["path"] == "tiled" else ""
    return f"{row['mapper']} [{path['path']}{tiles}]" if row["mapper"] == "folded" else f"{row['mapper']}{tiles}"


def print_report(report: dict) -> None:
    geometry = report["geometry"]
    print(f"torch {report['torch']}, {report['threads']} threads, device {report['device']}, {report['dtype']}")
    for result in report["results"]:
        print(f"\nE={geometry['experts']} k={geometry['top_k']} P={geometry['prefix_length']} D={geometry['width']} "
              f"depth={geometry['depth']} batch={result['batch']}")
        print(f"{'mapper':22} {'params stored':>14} {'per sample':>12} {'train ms':>10} {'x moe':>6} {'eval ms':>10} {'x moe':>6}")
        for row in result["rows"]:
            train = f"{row['train_ms']:.2f}" if row["train_ms"] is not None else "-"
            train_ratio = f"{row['train_x_moe']:.2f}" if row["train_x_moe"] is not None else "-"
            print(f"{describe_path(row):22} {row['params_stored']:>14,} {row['params_per_sample']:>12,} {train:>10} "
                  f"{train_ratio:>6} {row['eval_ms']:>10.2f} {row['eval_x_moe']:>6.2f}")
    print(f"\nstatic fold: relative error vs the exact fold on held-out inputs {report['static_fold_error']:.4f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.bench.mapper", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--width", type=int, default=768, help="LM width D (GPT-2: 768)")
    parser.add_argument("--clip-dim", type=int, default=512)
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-max-batch", type=int, default=64, help="time train steps only up to this batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"small geometry {QUICK_GEOMETRY}, seconds in all")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = {"width": args.width, "clip_dim": args.clip_dim, "prefix_length": args.prefix_length, "repeats": args.repeats}
    if args.quick:
        geometry |= QUICK_GEOMETRY
    report = run_benchmark(
        tuple(args.batch), depth=args.depth, experts=args.experts, top_k=args.top_k,
        kernel_sizes=tuple(args.kernel_sizes), train_max_batch=args.train_max_batch, **geometry,
    )
    print_report(report)
    return report


if __name__ == "__main__":
    main()
