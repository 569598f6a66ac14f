"""Expert-parallel parity worker: two optimizer steps of the real captioner + DeepSpeed engine on a
fixed global batch, run under `deepspeed --num_gpus N tests/ep_parity_worker.py ...`.

Every rank builds the same data (from a seed) and takes its slice `[r*G/W, (r+1)*G/W)` of each
global batch of G samples, so the global batch is the same at 1, 2 and 4 ranks. The initial weights
are the same at every world size too: every rank builds the captioner at ep_size 1 under a fixed
seed and loads that consolidated state into its share of the experts (`build_captioner(...,
consolidated_state=..., ep_rank=...)`). Rank 0 writes one safetensors file per variant with keys
`init/<name>`, `grad1/<name>`, `grad2/<name>` (the reduced gradients after each backward, before
the optimizer step) and `final/<name>` (the consolidated fp32 weights after the two steps), all
experts by global id, plus `<variant>.json` with the per-step global losses.

What would otherwise make the world sizes differ, and how it is taken out:

- Token dropping: DeepSpeed's capacity is `ceil(S / E * capacity_factor)` for the S samples
  (routed tokens) of the local batch. With `capacity_factor = E` the capacity is S, so even if
  every sample of a rank picks the same expert none is dropped, at any world size.
- The load-balancing loss: DeepSpeed computes `l_aux = E * sum_e mean_s(gate) * mean_s(mask)` on
  each rank's local batch. The mean over ranks of per-rank products of means is not the product of
  the global means, so `moe_aux` (and its gradient) depends on how the batch is split: it is a
  different objective at each world size, not a reduction error. It is weighted 0 here.
- Caption lengths: Hugging Face's LM loss is a mean over the valid tokens of the local batch, and
  the mean over ranks of per-rank token means equals the global token mean only when every sample
  has as many caption tokens. `max_caption_tokens` is set so every caption is truncated to the
  same length (checked: no padding).
- Dropout (none in the tiny LM, set to 0 anyway), top_k 1 (DeepSpeed's top-2 samples its second
  expert at train time), fp32, and a constant lr and Adam eps 1e-6 (see `_pin_optimizer`).

`--wrong-expert-grad-scale X` multiplies every expert gradient by X before DeepSpeed reduces it:
a negative control that shows what an expert gradient averaged over the wrong group (e.g. divided
by the expert-data-parallel size W/ep instead of W, i.e. X = ep) does to the comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

CLIP_DIM = 16
NUM_EXPERTS = 4
SEED = 1234


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", required=True, help="tiny LM folder (save_pretrained)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <variant>.safetensors/.json (rank 0)")
    parser.add_argument("--ep-sizes", default="1", help="comma-separated expert-parallel sizes, one variant each (x stages)")
    parser.add_argument("--zero-stages", default="2", help="comma-separated ZeRO stages, one variant each (x ep sizes)")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--adam-eps", type=float, default=1e-6, help="see _pin_optimizer")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--wrong-expert-grad-scale", type=float, default=None,
                        help="also run a ZeRO-2 variant at the first ep size whose expert gradients are multiplied by this (negative control)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (LOCAL_RANK is used)")
    return parser.parse_args(argv)


def global_batches(tokenizer, global_batch: int, steps: int):
    """`steps` global batches of (clip (G, C), captions), the same on every rank, and the token length that makes them all equal."""
    from vlpdist.data.synthetic import synthetic_captions

    generator = torch.Generator().manual_seed(SEED)
    clips = [torch.randn(global_batch, CLIP_DIM, generator=generator) for _ in range(steps)]
    captions = synthetic_captions(global_batch * steps, SEED)
    shortest = min(len(tokenizer(caption, add_special_tokens=False)["input_ids"]) for caption in captions)
    batches = [(clips[s], captions[s * global_batch : (s + 1) * global_batch]) for s in range(steps)]
    return batches, shortest + 1  # + the appended EOS


def _pin_optimizer(engine, lr: float, eps: float) -> None:
    """Detach the warmup-cosine schedule, and pin `lr` and Adam's `eps` in every optimizer group.

    The schedule is the same at every world size, but DeepSpeed's WarmupCosineLR with
    warmup_min_ratio 0 gives the first step lr 0 (review T8), which would make one of the two steps
    a no-op. Adam's update `m / (sqrt(v) + eps)` has slope up to 1/eps in the gradient, so an
    element whose gradient cancels to about eps (an expert that saw one sample, say) turns fp32
    rounding differences of ~1e-11 (a batch summed in another order) into weight differences of
    lr * 1e-11 / eps: 4e-6 at the config's eps 1e-8, measured, the size of the 1e-5 tolerance
    itself. eps 1e-6 bounds that at ~1e-7 and changes nothing the test is about (how gradients are
    averaged over ranks and expert groups, how the optimizer is partitioned)."""
    engine.lr_scheduler = None
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
        group["eps"] = eps


def gather_to_rank0(local: dict[str, torch.Tensor], ep_size: int, experts_per_rank: int) -> dict[str, torch.Tensor] | None:
    """Like `consolidated_state_dict`: rank 0 sends dense tensors and its experts, ranks 1..ep-1 their experts."""
    import torch.distributed as dist

    from vlpdist.parallel.expert_state import local_to_global_expert_state
    from vlpdist.parallel.engine import expert_parallel_rank

    rank = dist.get_rank()
    renamed = local_to_global_expert_state(local, expert_parallel_rank(ep_size), experts_per_rank)
    mine = {name: t.detach().float().cpu() for name, t in renamed.items()
            if rank == 0 or (rank < ep_size and ".deepspeed_experts." in name)}
    gathered: list = [None] * dist.get_world_size()
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged


def reduced_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """The reduced (averaged) fp32 gradient of every trainable param, as the optimizer will see it (collective)."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)  # every rank asks, in the same order
            grads[name] = torch.zeros_like(param) if grad is None else grad.detach().clone()
    return grads


def run_variant(args, info, variant: str, ep_size: int, zero_stage: int, wrong_scale: float | None) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from vlpdist.config import ModelConfig, TrainConfig
    from vlpdist.models.captioner import build_captioner, load_tokenizer
    from vlpdist.parallel.engine import build_engine, consolidated_state_dict, device_of, expert_parallel_rank

    world, rank = info.world_size, info.rank
    if args.global_batch % world:
        raise SystemExit(f"global batch {args.global_batch} is not divisible by the world size {world}")
    local_batch = args.global_batch // world
    batches, caption_tokens = global_batches(load_tokenizer(args.lm), args.global_batch, args.steps)
    model_cfg = ModelConfig(
        mapper="moe", prefix_length=4, mapper_depth=2, num_experts=NUM_EXPERTS, top_k=1, kernel_sizes=[3],
        capacity_factor=float(NUM_EXPERTS),  # capacity = ceil(S/E * E) = S: no sample is ever dropped
        moe_aux_weight=0.0,  # l_aux is per rank on the local batch: a different objective per world size
        lm_name=args.lm, freeze_lm=True, max_caption_tokens=caption_tokens,
    )
    train_cfg = TrainConfig(
        output_dir=str(args.out / f"run_{variant}"), micro_batch_size=local_batch, gradient_accumulation_steps=1,
        max_steps=args.steps, lr=args.lr, warmup_steps=1, weight_decay=0.01, grad_clip=args.grad_clip,
        zero_stage=zero_stage, precision="fp32", ep_size=ep_size, seed=0,
    )
    # The same initial weights at every world size: the ep_size-1 model under a fixed seed, consolidated.
    torch.manual_seed(SEED)
    reference = build_captioner(model_cfg, CLIP_DIM, 1)
    initial = {name: t.clone() for name, t in reference.global_state_dict(0).items() if not name.startswith("lm.")}
    del reference
    ep_rank = rank % ep_size
    torch.manual_seed(SEED + 1 + rank)  # anything not loaded from `initial` would differ between ranks
    model = build_captioner(model_cfg, CLIP_DIM, ep_size, consolidated_state=initial, ep_rank=ep_rank)
    for sub in model.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
    model = model.to(device_of(info))
    Path(train_cfg.output_dir).mkdir(parents=True, exist_ok=True)
    engine, _ = build_engine(model, train_cfg, info, Path(train_cfg.output_dir))
    if ep_size > 1 and expert_parallel_rank(ep_size) != ep_rank:
        raise RuntimeError("DeepSpeed's expert-parallel rank layout is not rank % ep_size")
    _pin_optimizer(engine, args.lr, args.adam_eps)
    if wrong_scale is not None:
        for name, param in engine.module.named_parameters():
            if param.requires_grad and ".deepspeed_experts." in name:
                param.register_hook(lambda grad, scale=wrong_scale: grad * scale)

    records: dict[str, torch.Tensor] = {}
    start = consolidated_state_dict(engine.module, ep_size, include_lm=False)
    losses = []
    for step, (clip_GC, captions) in enumerate(batches, start=1):
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        input_ids, attention_mask = engine.module.tokenize(captions[rows])
        if not bool(attention_mask.all()):
            raise RuntimeError("captions of unequal token length: the per-rank token means would not average to the global one")
        device = device_of(info)
        terms = engine(clip_GC[rows].to(device), input_ids.to(device), attention_mask.to(device))
        engine.backward(terms["cap"])  # moe_aux_weight is 0 here
        grads = gather_to_rank0(reduced_grads(engine.module), ep_size, engine.module.experts_per_rank)
        engine.step()
        loss = terms["cap"].detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / world)
        if rank == 0:
            records.update({f"grad{step}/{name}": t for name, t in grads.items()})
    final = consolidated_state_dict(engine.module, ep_size, include_lm=False)
    if rank == 0:
        records.update({f"init/{name}": t for name, t in start.items()})
        records.update({f"final/{name}": t for name, t in final.items()})
        args.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in records.items()}, str(args.out / f"{variant}.safetensors"))
        summary = {"world_size": world, "ep_size": ep_size, "zero_stage": zero_stage, "losses": losses,
                   "caption_tokens": caption_tokens, "wrong_expert_grad_scale": wrong_scale}
        (args.out / f"{variant}.json").write_text(json.dumps(summary))
    dist.barrier()


def main(argv=None) -> int:
    from vlpdist.parallel.engine import init_distributed

    args = parse_args(argv)
    # DeepSpeed's CPU shm collective serves only `inference_all_reduce`, never training; skip its JIT
    # build, which otherwise waits on the shared torch_extensions lock, for minutes when another
    # process (a Slurm-launched run) keeps rebuilding it with a different command line.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    info = init_distributed(timeout_s=600)  # generous: 2 busy cores can make a 4-rank start slow
    ep_sizes = [int(e) for e in args.ep_sizes.split(",") if e]
    for ep_size in ep_sizes:  # one process group serves several ep sizes: each has its own expert groups
        for stage in [int(s) for s in args.zero_stages.split(",") if s]:
            run_variant(args, info, f"ep{ep_size}_zero{stage}", ep_size, stage, None)
    if args.wrong_expert_grad_scale is not None:
        run_variant(args, info, f"ep{ep_sizes[0]}_zero2_wrong_expert_grads", ep_sizes[0], 2, args.wrong_expert_grad_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
