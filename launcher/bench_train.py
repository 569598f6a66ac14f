"""Benchmark: one full training step (loader with tokenising workers + mapper/MoE + LM + DeepSpeed backward and
optimizer step) vs a bare LM forward+backward over the same tokens, side by side in one run
(with the plain mapper+LM forward/backward between them, to split the overhead).

    python launcher/bench_train.py [--steps 10] [--rounds 3] [--batch 32] [--width 256] [--layers 4]

One process (world size 1, ep_size 1), CPU or one GPU, a random GPT-2-shaped LM built locally
(no hub) with a BPE tokenizer trained on synthetic captions, and synthetic feature shards.
The ratio says what the training machinery costs on top of the LM work it cannot avoid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _timed_rounds(variants: dict, steps: int, rounds: int, synchronize) -> dict[str, float]:
    """Seconds per call of each variant: rounds interleave the variants (so load on a shared machine
    hits all alike) and the best round counts. Two warm-up calls each first."""
    for step in variants.values():
        step()
        step()
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize()
            best[name] = min(best[name], (time.perf_counter() - started) / steps)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher/bench_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed calls per round and variant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=256, help="LM width (GPT-2 small: 768)")
    parser.add_argument("--layers", type=int, default=4, help="LM layers (GPT-2 small: 12)")
    parser.add_argument("--clip-dim", type=int, default=512)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vlpdist-bench-") as folder:
        return _bench(args, Path(folder))


def _bench(args: argparse.Namespace, work: Path) -> dict:
    from data_ingest.sources.demo_lm import make_demo_lm
    from vlpdist.config import load_config
    from vlpdist.data.feature_shards import build_shard_plan, build_train_loader, list_feature_shards
    from vlpdist.data.synthetic import synthetic_captions, write_synthetic_feature_shards
    from vlpdist.parallel.engine import device_of, init_distributed
    from vlpdist.train.loop import build_model_and_engine

    lm_dir = make_demo_lm(work / "lm", synthetic_captions(500, 1), width=args.width, layers=args.layers,
                          heads=max(args.width // 64, 1), vocab_size=400, steps=1, batch_size=8)
    features = work / "features"
    write_synthetic_feature_shards(features, 3, max(4 * args.batch, 64), dim=args.clip_dim)
    config = load_config(None, [
        f"root={work}", f"train.features_dir={features}", f"train.output_dir={work / 'run'}", f"model.lm_name={lm_dir}",
        "model.prefix_length=10", "model.num_experts=4", "model.max_caption_tokens=20", "train.ep_size=1",
        f"train.micro_batch_size={args.batch}", "train.num_workers=1", "train.warmup_steps=1",
        f"train.max_steps={args.steps * args.rounds + 10}",
    ])
    info = init_distributed(config.train.dist_timeout_s)
    device = device_of(info)
    (work / "run").mkdir()
    engine, _ = build_model_and_engine(config, info, work / "run", args.clip_dim)
    captioner = engine.module
    from vlpdist.losses.terms import loss_weights, weighted_total

    weights = loss_weights(config)
    from functools import partial

    from vlpdist.models.captioner import tokenize_captions

    plan = build_shard_plan(list_feature_shards(features), 1, 1, args.batch, 0)
    # As in training: captions tokenised in the loader worker, pinned batches copied without blocking.
    tokenize = partial(tokenize_captions, captioner.tokenizer, config.model.max_caption_tokens)
    loader = iter(build_train_loader(plan, 0, 0, tokenize, pin_memory=info.on_gpu))
    synchronize = torch.cuda.synchronize if info.on_gpu else (lambda: None)
    tokens_per_step = []

    def full_step() -> None:
        batch = next(loader)
        tokens_per_step.append(int(batch["attention_mask"].sum()))
        out = engine(*(batch[key].to(device, non_blocking=True) for key in ("clip", "input_ids", "attention_mask")))
        engine.backward(weighted_total(out, weights))
        engine.step()

    # The bare LM work of the same step: forward + backward over [prefix | caption] embeddings
    # (gradients reach the prefix, as they must to train a prefix through a frozen LM).
    fixed = next(loader)
    ids_BT, mask_BT = (t.to(device) for t in captioner.tokenize(fixed["caption"]))
    embed = captioner.lm.get_input_embeddings()
    prefix_BPD = torch.randn(args.batch, config.model.prefix_length, embed.embedding_dim, device=device,
                             dtype=embed.weight.dtype, requires_grad=True)

    def bare_lm_step() -> None:
        captioner.caption_loss_after(prefix_BPD, ids_BT, mask_BT).backward()

    # The same model outside DeepSpeed on one fixed batch: mapper + LM forward/backward, no loader,
    # no optimizer, no ZeRO hooks. It splits the full step's overhead into model vs machinery.
    from vlpdist.models.captioner import build_captioner

    plain = build_captioner(config.model, args.clip_dim, 1).to(device)
    fixed_clip = fixed["clip"].to(device)

    def model_step() -> None:
        weighted_total(plain(fixed_clip, ids_BT, mask_BT), weights).backward()
        plain.zero_grad(set_to_none=True)

    seconds = _timed_rounds({"full": full_step, "model": model_step, "bare": bare_lm_step}, args.steps, args.rounds, synchronize)
    full_s, model_s, bare_s = seconds["full"], seconds["model"], seconds["bare"]
    tokens = sum(tokens_per_step) / len(tokens_per_step)
    result = {
        "device": "cuda" if info.on_gpu else "cpu",
        "batch": args.batch, "lm_width": args.width, "lm_layers": args.layers,
        "full_step_ms": 1000 * full_s, "model_fwd_bwd_ms": 1000 * model_s, "bare_lm_ms": 1000 * bare_s,
        "ratio_full_over_bare": full_s / bare_s, "ratio_model_over_bare": model_s / bare_s,
        "full_samples_per_s": args.batch / full_s, "full_caption_tokens_per_s": tokens / full_s,
    }
    print(f"{'':28s}{'ms/step':>10s}{'samples/s':>12s}")
    print(f"{'full training step':28s}{result['full_step_ms']:10.1f}{args.batch / full_s:12.1f}")
    print(f"{'mapper+LM fwd+bwd (plain)':28s}{result['model_fwd_bwd_ms']:10.1f}{args.batch / model_s:12.1f}")
    print(f"{'bare LM fwd+bwd':28s}{result['bare_lm_ms']:10.1f}{args.batch / bare_s:12.1f}")
    print(f"ratio full / bare: {result['ratio_full_over_bare']:.2f}, mapper+LM / bare: {result['ratio_model_over_bare']:.2f}  ({result['device']}, batch {args.batch}, "
          f"LM {args.layers}x{args.width}, prefix {config.model.prefix_length} + ~{tokens / args.batch:.0f} caption tokens)")
    return result


if __name__ == "__main__":
    main()
