"""Training step cost at an LM's real geometry, side by side in one run: `python -m launcher.bench.train [--quick] ...`.

Rows, all on the same tokens (prefix P + T caption tokens, every caption exactly T tokens), timed
in interleaved rounds (so load from other processes on a shared machine hits every row alike; the
best round counts):
- `full`: the training loop itself (`vlpdist.train.steps.train_steps`: loader with tokenising
  workers, DeepSpeed engine forward/backward/step, the per-step collective), MoE mapper, LM frozen;
  with alignment off and on (ITC + SupCon over a 65,536-entry bank with the momentum mapper),
  text target lm, lm_cached (the cache filled during the warm-up, as after the first epoch) and clip;
- `full, unfused AdamW`: the same loop on an engine whose optimizer is torch's AdamW unfused
  (vlpdist's default is torch's fused AdamW, a setting DeepSpeed passes through to torch) — what
  the setting buys; asked as `torch_adam` + `fused: false`, so DeepSpeed never builds its FusedAdam
  with `fused` (which it refuses);
- `full, compiled`: the loop with `train.compile=true` (the LM and mapper compiled for the
  training step), against the bare LM step compiled the same way;
- `bare LM`: forward + backward of the frozen LM over [prefix | caption] embeddings, gradients
  reaching the prefix only, through the captioner's own caption loss (its LM head runs at the
  caption positions only): the work no captioner of a frozen LM can avoid;
- `ClipCap`: ClipCap's own training step as its code runs it (`launcher.bench.clipcap`: its
  transformer mapper, 8 layers, GPT-2 in eval mode outside the optimizer, full logits) on a fixed
  batch of the same captions, at its COCO recipe (prefix 40, clip length 40) and at prefix 10, with
  an optimizer of the same class and settings as the full step's (fused or not alike), the same
  precision (autocast bf16 where ours runs bf16) and the same compile setting; plus the recipe
  without gradients to GPT-2's weights (which its code computes, then leaves unused);
- the pieces of the aligned step (mapper fwd+bwd, LM text forward, momentum forward, key gather +
  ITC + SupCon fwd+bwd, enqueue), each as a share of the aligned lm_cached step.

The LM is `GPT2LMHeadModel(GPT2Config())` (GPT-2 small: 12 x 768, vocabulary 50,257) with random
weights, saved locally and loaded through the captioner's own `from_pretrained(folder)`; its
tokenizer is a byte-level BPE trained on synthetic captions (ids fill only part of the vocabulary;
the LM head still spans all of it). `--quick` shrinks the LM so the whole run takes seconds.
`run_benchmark(...)` returns the numbers as a JSON-ready dict.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from launcher.bench.clipcap import RECIPE, ClipCapStep, describe_optimizer

TEXT_TARGETS = ("lm", "lm_cached", "clip")
QUICK = {"width": 64, "layers": 2, "heads": 2, "vocab_size": 2048, "batch": 4, "steps": 1, "rounds": 1,
         "bank_size": 1024, "samples_per_shard": 8}
# ClipCap's steps measured beside ours: name -> (prefix length, clip length, gradients to GPT-2's weights).
CLIPCAP_VARIANTS = {
    "ClipCap step, prefix 40/40": (40, 40, True),  # its COCO transformer recipe
    "ClipCap step, prefix 10/10": (10, 10, True),
    "ClipCap step, prefix 40/40, no LM weight gradients": (40, 40, False),
}


def timed_rounds(variants: dict, steps: int, rounds: int, synchronize, warmup: dict[str, int] | None = None) -> dict[str, float]:
    """Seconds per call of each variant: `warmup[name]` calls first (default 1), then `rounds`
    rounds that interleave the variants, `steps` calls each; the best round counts."""
    for name, step in variants.items():
        for _ in range((warmup or {}).get(name, 1)):
            step()
    synchronize()
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


def long_captions(count: int, phrases: int, seed: int) -> list[str]:
    """Captions of `phrases` synthetic phrases each, long enough to be cut at the caption length."""
    from vlpdist.data.synthetic import synthetic_captions

    parts = synthetic_captions(count * phrases, seed)
    return [" and ".join(parts[i * phrases : (i + 1) * phrases]) for i in range(count)]


def write_bench_shards(folder: Path, captions: list[str], num_shards: int, clip_dim: int, seed: int) -> None:
    """Feature shards in the contract format: unit-norm random CLIP image/text embeddings, one
    caption per sample, one object label from a 4-name vocabulary (SupCon has positives)."""
    import webdataset as wds

    from vlpdist.atomic import atomic_write_json
    from vlpdist.data.feature_format import encode_feature_sample, write_label_vocabulary
    from vlpdist.data.feature_shards import STATS_SUFFIX

    names = ["circle", "square", "triangle", "star"]
    folder.mkdir(parents=True, exist_ok=True)
    write_label_vocabulary(folder, names)
    rng = np.random.default_rng(seed)
    per_shard = len(captions) // num_shards
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                caption = captions[shard * per_shard + index]
                image, text = rng.standard_normal((2, clip_dim))
                label = int(rng.integers(len(names)))
                writer.write(encode_feature_sample(
                    key=f"{shard:05d}{index:04d}", image_embedding=image / np.linalg.norm(image),
                    text_embeddings=(text / np.linalg.norm(text))[None, :], captions=[caption], labels=[label],
                    label_names=[names[label]], scores={}, decision="kept", url=f"http://127.0.0.1/{shard}/{index}.jpg",
                    original_caption=caption,
                ))
        atomic_write_json(folder / f"{path.stem}{STATS_SUFFIX}", {"shard": path.stem, "written": per_shard})


def make_lm(folder: Path, captions: list[str], width: int | None, layers: int | None, heads: int | None,
            vocab_size: int | None) -> dict:
    """A random-weight GPT-2 (`GPT2Config()` defaults unless shrunk) and a BPE tokenizer, saved in `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data_ingest.sources.demo_lm import train_caption_tokenizer

    shrink = {key: value for key, value in
              {"n_embd": width, "n_layer": layers, "n_head": heads, "vocab_size": vocab_size}.items() if value is not None}
    tokenizer = train_caption_tokenizer(captions, vocab_size=min(512, shrink.get("vocab_size", 512)))
    config = GPT2Config(**shrink, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"width": config.n_embd, "layers": config.n_layer, "heads": config.n_head, "vocab_size": config.vocab_size,
            "tokenizer_vocab": len(tokenizer)}


class LoopRunner:
    """One engine (+ alignment objective) and the real training loop, run `steps` optimizer steps per call."""

    def __init__(self, config, info, run_dir: Path, clip_dim: int, label_names: list[str], ds_optimizer_params: dict | None = None):
        from vlpdist.data.feature_shards import QuestionSampling, build_shard_plan, build_train_loader, list_feature_shards
        from vlpdist.models.captioner import tokenize_captions, tokenize_lm_inputs
        from vlpdist.monitor.tensorboard import TensorBoardLogger
        from vlpdist.train.preemption import PreemptionSignal
        from vlpdist.train.run_setup import DataWorld, build_alignment_objective, build_model_and_engine
        from vlpdist.train.state import TrainState
        from functools import partial

        run_dir.mkdir(parents=True, exist_ok=True)  # a rerun on the same --work reuses it (no checkpoints, no logs in it)
        self.config, self.info, self.run_dir = config, info, run_dir
        self.engine, self.scheduler = build_model_and_engine(config, info, run_dir, clip_dim, optimizer_params=ds_optimizer_params)
        device = self.engine.device
        self.objective = build_alignment_objective(config, self.engine.module, DataWorld(label_names=label_names), device)
        train = config.train
        self.plan = build_shard_plan(list_feature_shards(train.features_dir), 1, train.num_workers, train.micro_batch_size, train.seed)
        # The loader as the training loop builds it: the alignment text and the LM's input (captions here).
        tokenize = partial(tokenize_captions, self.engine.module.tokenizer, config.model.max_caption_tokens)
        lm_inputs = partial(tokenize_lm_inputs, self.engine.module.tokenizer, config.model.max_caption_tokens,
                            config.model.max_answer_tokens, config.model.question_template)
        sampling = QuestionSampling(train.question_fraction, train.answer_target, train.seed)
        self.loader = iter(build_train_loader(self.plan, info.rank, 0, tokenize, pin_memory=info.on_gpu,
                                              lm_inputs=lm_inputs, sampling=sampling))
        self.state = TrainState()
        self.tb = TensorBoardLogger(run_dir / "tb", False)
        self.preemption = PreemptionSignal()

    def step(self, steps: int = 1) -> None:
        import contextlib
        import io

        from vlpdist.train.steps import train_steps

        self.config.train.max_steps = self.state.step + steps
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's log line at its last step
            train_steps(self.config, self.info, self.engine, self.scheduler, self.loader, self.state, self.tb, self.preemption,
                        self.run_dir, self.plan, self.state.step, self.objective)


def run_benchmark(
    *,
    batch: int = 8,
    steps: int = 1,
    rounds: int = 3,
    width: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    vocab_size: int | None = None,
    prefix_length: int = 10,
    caption_tokens: int = 40,
    clip_dim: int = 512,
    bank_size: int = 65536,
    samples_per_shard: int | None = None,
    text_targets: tuple[str, ...] = TEXT_TARGETS,
    unfused_adamw_row: bool = True,
    compiled_rows: bool = False,
    compile_lm: bool = False,
    clipcap_variants: tuple[str, ...] = tuple(CLIPCAP_VARIANTS),
    work: Path | None = None,
) -> dict:
    """Time every row (see the module docstring); returns a JSON-ready dict. `width`/`layers`/`heads`/
    `vocab_size` None keep GPT-2 small's. `compile_lm` runs every row with `train.compile=true` (the
    LM and mapper compiled for the training step; ClipCap's LM and mapper likewise); `compiled_rows`
    adds one compiled full step and bare step beside the eager rows. `clipcap_variants`: which of
    `CLIPCAP_VARIANTS` to measure (the recipe and prefix 10 always)."""
    arguments = dict(locals())  # first statement: exactly the keyword arguments, forwarded whole below
    if work is None:
        with tempfile.TemporaryDirectory(prefix="vlpdist-bench-train-") as folder:
            return run_benchmark(**(arguments | {"work": Path(folder)}))
    import os

    from vlpdist.config import load_config
    from vlpdist.parallel.engine import device_of, init_distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    samples_per_shard = samples_per_shard or 2 * batch
    captions = long_captions(3 * samples_per_shard, phrases=caption_tokens // 4 + 2, seed=1)
    lm = make_lm(work / "lm", captions, width, layers, heads, vocab_size)
    features = work / "features"
    write_bench_shards(features, captions, 3, clip_dim, seed=0)
    base = [
        f"root={work}", f"train.features_dir={features}", f"model.lm_name={work / 'lm'}",
        # The CC3M recipe's mapper: 8 experts, top-2, kernels 3 and 5, depth 2 (the last two are the defaults).
        f"model.prefix_length={prefix_length}", f"model.max_caption_tokens={caption_tokens}", "model.num_experts=8", "model.top_k=2",
        "train.ep_size=1",
        f"train.micro_batch_size={batch}", "train.num_workers=1", "train.warmup_steps=1", "train.max_steps=1000000",
        "train.checkpoint_every=1000000000", "train.log_every=1000000000", "train.caption_log_every=0",
        f"align.bank_size={bank_size}", f"train.compile={str(compile_lm).lower()}",
    ]
    info = init_distributed(300.0)
    device = device_of(info)
    synchronize = torch.cuda.synchronize if info.on_gpu else (lambda: None)
    label_names = ["circle", "square", "triangle", "star"]

    def config_for(name: str, *extra: str):
        return load_config(None, base + [f"train.output_dir={work / 'runs' / name}", *extra])

    align_on = ["align.itc_weight=1.0", "align.supcon_weight=1.0"]
    runners = {"full, alignment off": LoopRunner(config_for("off"), info, work / "runs" / "off", clip_dim, label_names)}
    for target in text_targets:
        runners[f"full, ITC+SupCon, text {target}"] = LoopRunner(
            config_for(target, *align_on, f"align.text_target={target}"), info, work / "runs" / target, clip_dim, label_names)
    if unfused_adamw_row:
        runners["full, alignment off, unfused AdamW"] = LoopRunner(
            config_for("unfused"), info, work / "runs" / "unfused", clip_dim, label_names, {"torch_adam": True, "fused": False})
    if compiled_rows and not compile_lm:
        runners["full, alignment off, compiled"] = LoopRunner(
            config_for("compiled", "train.compile=true"), info, work / "runs" / "compiled", clip_dim, label_names)

    off = runners["full, alignment off"]
    captioner = off.engine.module
    fixed = next(off.loader)  # the fixed batch of the rows outside the loop
    off.state.data_position += 1
    ids_BT, mask_BT = fixed["input_ids"].to(device), fixed["attention_mask"].to(device)
    embed = captioner.lm.get_input_embeddings()
    prefix_BPD = torch.randn(batch, prefix_length, embed.embedding_dim, device=device, dtype=embed.weight.dtype,
                             requires_grad=True)

    def bare_step_of(model) -> Callable[[], None]:
        # The engine's module is in training mode: a compiled run's bare step goes through its compiled LM.
        return lambda: model.caption_loss_after(prefix_BPD, ids_BT, mask_BT).backward()

    torch_optimizer = off.engine.optimizer.optimizer  # DeepSpeed's ZeRO optimizer wraps the torch one
    low_precision = embed.weight.dtype if embed.weight.dtype != torch.float32 else None
    clipcap_steps = {
        name: ClipCapStep(work / "lm", clip_dim, prefix, clip_length, RECIPE["num_layers"], torch_optimizer, device, fixed,
                          autocast_dtype=low_precision, compile_modules=compile_lm, lm_weight_grads=weight_grads)
        for name, (prefix, clip_length, weight_grads) in CLIPCAP_VARIANTS.items()
        if name in {*clipcap_variants, "ClipCap step, prefix 40/40", "ClipCap step, prefix 10/10"}}

    variants = {name: runner.step for name, runner in runners.items()}
    variants |= {"bare LM fwd+bwd": bare_step_of(captioner), **clipcap_steps}
    compiled_runner = runners.get("full, alignment off, compiled")
    if compiled_runner is not None:
        variants["bare LM fwd+bwd, compiled"] = bare_step_of(compiled_runner.engine.module)
    pieces_of = next((name for name in runners if name.endswith("text lm_cached")), None)
    if pieces_of is not None:
        variants |= piece_steps(runners[pieces_of], fixed, device, clip_dim)
    # The cached text target is measured once every caption is cached (after one epoch, as in a long run).
    warmup = {name: runner.plan.batches_per_rank + 1 for name, runner in runners.items() if "lm_cached" in name}
    # Compiled rows: the first call compiles, the second settles any recompile.
    for name in variants:
        if compile_lm or name.endswith(", compiled"):
            warmup[name] = max(warmup.get(name, 1), 2)
    seconds = timed_rounds(variants, steps, rounds, synchronize, warmup)

    bare_s = seconds["bare LM fwd+bwd"]
    off_s = seconds["full, alignment off"]
    tokens = prefix_length + int(fixed["attention_mask"].sum(dim=1).max())
    rows = []
    for name, value in seconds.items():
        if name.startswith("piece:"):
            continue
        # Each step against the bare LM step at the same compile setting.
        own_bare_s = seconds["bare LM fwd+bwd, compiled"] if name.endswith(", compiled") else bare_s
        rows.append({"name": name, "ms": 1e3 * value, "samples_per_s": batch / value,
                     "x_bare": own_bare_s / value, "x_clipcap_40": seconds["ClipCap step, prefix 40/40"] / value,
                     "x_clipcap_10": seconds["ClipCap step, prefix 10/10"] / value,
                     "x_alignment_off": value / off_s if name.startswith("full") else None})
    pieces = []
    if pieces_of is not None:
        aligned_s = seconds[pieces_of]
        measured = {name.removeprefix("piece: "): value for name, value in seconds.items() if name.startswith("piece:")}
        measured["caption LM fwd+bwd"] = bare_s
        # terms() runs the momentum forward too; its own row is subtracted from the loss row.
        measured["key gather + ITC + SupCon fwd+bwd"] = max(measured["key gather + ITC + SupCon fwd+bwd"] - measured["momentum forward"], 0.0)
        # The cached step runs no LM text forward (that is what text target lm adds): not part of its sum.
        in_step = sum(value for name, value in measured.items() if name != "LM text forward")
        measured["rest (DeepSpeed backward/step, loader, loop)"] = max(aligned_s - in_step, 0.0)
        pieces = [{"name": name if name != "LM text forward" else "LM text forward (text target lm only; not in this step)",
                   "ms": 1e3 * value, "share_of_step": value / aligned_s} for name, value in measured.items()]
    cache = next((runner.objective.text_cache for runner in runners.values()
                  if runner.objective is not None and runner.objective.text_cache is not None), None)
    return {
        "device": "cuda" if info.on_gpu else "cpu",
        "precision": "bf16" if embed.weight.dtype == torch.bfloat16 else str(embed.weight.dtype).removeprefix("torch."),
        "compiled": compile_lm,
        "optimizer": describe_optimizer(torch_optimizer),
        "clipcap": {"optimizer": describe_optimizer(next(iter(clipcap_steps.values())).optimizer),
                    "precision": f"autocast {str(low_precision).removeprefix('torch.')}" if low_precision else "fp32",
                    "compiled": compile_lm, "layers": RECIPE["num_layers"],
                    "variants": [{"name": name, "prefix_length": prefix, "clip_length": clip_length, "lm_weight_grads": weight_grads,
                                  "trainable_params": clipcap_steps[name].trainable_params()}
                                 for name, (prefix, clip_length, weight_grads) in CLIPCAP_VARIANTS.items() if name in clipcap_steps]},
        "lm": lm,
        "mapper": {"kind": captioner.mapper.__class__.__name__, "experts": off.config.model.num_experts,
                   "top_k": off.config.model.top_k, "depth": off.config.model.mapper_depth,
                   "trainable_params": sum(p.numel() for p in captioner.parameters() if p.requires_grad)},
        "batch": batch, "prefix_length": prefix_length, "caption_tokens": tokens - prefix_length, "sequence": tokens,
        "bank_size": bank_size, "steps": steps, "rounds": rounds, "torch_threads": torch.get_num_threads(),
        "text_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
        "rows": rows,
        "pieces": pieces,
        "aligned_step_ms": {target: 1e3 * seconds[f"full, ITC+SupCon, text {target}"] for target in text_targets},
    }


def piece_steps(runner: LoopRunner, batch: dict, device: torch.device, clip_dim: int) -> dict:
    """Each piece of an aligned step alone, on a plain captioner of `runner`'s config (outside
    DeepSpeed, whose gradient hooks allow one backward per step) and an objective of its own (its
    bank and momentum model, so the loop's bank is left as it was)."""
    from vlpdist.models.captioner import build_captioner
    from vlpdist.train.run_setup import DataWorld, build_alignment_objective

    torch.manual_seed(runner.config.train.seed)
    dtype = runner.engine.module.lm.get_input_embeddings().weight.dtype
    captioner = build_captioner(runner.config.model, clip_dim, 1, align=runner.config.align).to(device, dtype)
    captioner.heads.float()
    objective = build_alignment_objective(runner.config, captioner, DataWorld(label_names=["circle", "square", "triangle", "star"]),
                                          device)
    clip_BC = batch["clip"].to(device)
    ids_BT, mask_BT = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with torch.no_grad():
        text_feature = captioner.lm_text_features(ids_BT, mask_BT).float()

    def mapper_step() -> None:
        prefix_BPD, aux, _ = captioner.map_prefix(clip_BC)
        (prefix_BPD.float().square().mean() + aux).backward()

    def text_forward() -> None:
        with torch.no_grad():
            captioner.lm_text_features(ids_BT, mask_BT)

    def momentum_forward() -> None:
        objective.momentum.keys(clip_BC, text_feature)

    prefix_BPD = torch.randn(clip_BC.shape[0], captioner.prefix_length, text_feature.shape[1], device=device, requires_grad=True)

    def loss_terms() -> None:
        heads = captioner.heads
        out = {"visual_embed": heads.visual_embed(prefix_BPD), "text_embed": heads.text_embed(text_feature),
               "text_feature": text_feature, "itc_temperature": heads.temperature()}
        sum(objective.terms(out, batch, clip_BC).values()).backward()

    def enqueue() -> None:
        if objective.pending_rows is None:
            loss_terms()
        objective.enqueue(0)

    return {"piece: mapper fwd+bwd": mapper_step, "piece: LM text forward": text_forward,
            "piece: momentum forward": momentum_forward, "piece: key gather + ITC + SupCon fwd+bwd": loss_terms,
            "piece: enqueue": enqueue}


def print_report(report: dict) -> None:
    lm = report["lm"]
    print(f"{report['device']} {report['precision']}, LM {lm['layers']}x{lm['width']} vocab {lm['vocab_size']:,}, batch "
          f"{report['batch']}, prefix {report['prefix_length']} + {report['caption_tokens']} caption tokens, "
          f"{report['torch_threads']} threads, best of {report['rounds']} rounds")
    print(f"optimizer {report['optimizer']['name']} (ClipCap's alike); ClipCap {report['clipcap']['precision']}")
    print(f"{'':52}{'ms/step':>10}{'samples/s':>11}{'x bare':>8}{'x CC 40':>9}{'x CC 10':>9}{'x align off':>12}")
    for row in report["rows"]:
        off = f"{row['x_alignment_off']:.2f}" if row["x_alignment_off"] is not None else "-"
        print(f"{row['name']:52}{row['ms']:10.1f}{row['samples_per_s']:11.2f}{row['x_bare']:8.2f}{row['x_clipcap_40']:9.2f}"
              f"{row['x_clipcap_10']:9.2f}{off:>12}")
    if report["pieces"]:
        print("pieces of the aligned (lm_cached) step:")
        for piece in report["pieces"]:
            print(f"  {piece['name']:44}{piece['ms']:10.1f} ms {100 * piece['share_of_step']:6.1f} %")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launcher.bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1, help="timed calls per round and row")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=None, help="LM width (default GPT-2 small: 768)")
    parser.add_argument("--layers", type=int, default=None, help="LM layers (default GPT-2 small: 12)")
    parser.add_argument("--heads", type=int, default=None, help="LM heads (default GPT-2 small: 12)")
    parser.add_argument("--vocab-size", type=int, default=None, help="LM vocabulary (default GPT-2: 50,257)")
    parser.add_argument("--compile", action="store_true", help="every row with train.compile=true (the LM and mapper compiled)")
    parser.add_argument("--compiled-rows", action="store_true", help="add a compiled full step and bare step beside the eager rows")
    parser.add_argument("--quick", action="store_true", help=f"a small LM and batch: {QUICK}")
    args = parser.parse_args(argv)
    settings = dict(batch=args.batch, steps=args.steps, rounds=args.rounds, width=args.width, layers=args.layers,
                    heads=args.heads, vocab_size=args.vocab_size, compile_lm=args.compile,
                    compiled_rows=args.compiled_rows)
    if args.quick:
        settings |= QUICK
    report = run_benchmark(**settings)
    print_report(report)
    return report


if __name__ == "__main__":
    main()
