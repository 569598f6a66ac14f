"""bf16 checkpoint worker for tests/test_consolidate.py: a few bf16 optimizer steps of the real
captioner + DeepSpeed engine at ep_size 2, a checkpoint written by the training loop's own
`save_checkpoint`, and the live consolidated fp32 state beside it. Run under
`deepspeed --num_gpus 2 tests/consolidate_bf16_worker.py --lm ... --out ...` on CPU (gloo).

Why not `launcher/train.py train.precision=bf16`: vlpdist refuses half precision without a GPU
(`resolve_precision`), since CPU bf16 training is slow and not what anyone runs. DeepSpeed itself
trains bf16 on CPU, so the engine is built here from the DeepSpeed config vlpdist generates for a
GPU (bf16), with only the CUDA-only piece turned off (comm overlap). That gives a real
bf16 checkpoint, whose module files hold bf16 weights and whose fp32 masters sit in the ZeRO
optimizer shards: the case offline consolidation must read from the shards.

DeepSpeed writes two optimizer-shard formats for bf16 ZeRO 1/2, one per VARIANTS entry: its ZeRO
optimizer (stage 2, and stage 1 by default) and its BF16_Optimizer (stage 1 with fp32 gradient
accumulation, `data_types.grad_accum_dtype`). For each variant asked for, rank 0 writes
`<out>/<variant>/checkpoints/step_00000003/` and `<out>/<variant>/live_fp32.safetensors`
(`consolidated_state_dict`, what the live export writes), and `rank0_received_bytes.json`: the size
of every tensor rank 0 received while consolidating (what its device had to hold for the transfer).
Every rank writes `<out>/<variant>/rank<R>_experts.safetensors`: the fp32 masters of the experts
it holds, under its local ids (DeepSpeed's own `safe_get_full_fp32_param`), the per-rank truth
that consolidation must reproduce. Any world size that ep_size 2 divides works (2 or 4 ranks).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

CLIP_DIM = 32
EP_SIZE = 2
STEPS = 3
SEED = 4321
TINY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train_cpu_tiny.yaml"
VARIANTS = {"zero2": (2, None), "zero1_fp32_grad_accum": (1, "fp32")}
"""variant -> (ZeRO stage, `data_types.grad_accum_dtype` or None for DeepSpeed's default)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", required=True, help="tiny LM folder (save_pretrained)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <variant>/ (rank 0)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher (LOCAL_RANK is used)")
    return parser.parse_args(argv)


def build_bf16_engine(config, info, zero_stage: int, grad_accum_dtype: str | None):
    """The captioner at ep_size 2 in a bf16 DeepSpeed engine (experts in their own optimizer groups, as `build_engine`)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from vlpdist.models.captioner import build_captioner
    from vlpdist.parallel.deepspeed_config import build_deepspeed_config

    config.train.zero_stage = zero_stage
    torch.manual_seed(SEED + info.rank % EP_SIZE)  # the ranks of an expert-parallel group draw different experts
    model = build_captioner(config.model, CLIP_DIM, EP_SIZE, ep_rank=info.rank % EP_SIZE)
    ds_config = build_deepspeed_config(config.train, info.world_size, on_gpu=True)
    ds_config["zero_optimization"]["overlap_comm"] = False  # needs CUDA streams
    if grad_accum_dtype is not None:
        ds_config["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer([{"params": trainable, "name": "trainable"}])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine


def train_steps(engine, info) -> None:
    """STEPS optimizer steps on seeded random CLIP embeddings and synthetic captions (this rank's own batch)."""
    from vlpdist.data.synthetic import synthetic_captions
    from vlpdist.models.captioner import tokenize_captions

    generator = torch.Generator().manual_seed(SEED + info.rank)
    batch = engine.train_micro_batch_size_per_gpu()
    for step in range(STEPS):
        clip_BC = torch.randn(batch, CLIP_DIM, generator=generator).bfloat16()
        input_ids_BT, attention_mask_BT = tokenize_captions(
            engine.module.tokenizer, 16, synthetic_captions(batch, SEED + step * info.world_size + info.rank)
        )
        out = engine(clip_BC, input_ids_BT, attention_mask_BT)
        engine.backward(out["cap"])  # the caption loss: every mapper param, experts and router included, gets a gradient
        engine.step()


def local_expert_masters(engine) -> dict[str, torch.Tensor]:
    """This rank's experts, fp32 masters under their local ids (a collective: every rank asks for its own, in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(param).float().cpu() for name, param in engine.module.named_parameters()
            if ".deepspeed_experts." in name}


@contextmanager
def recorded_receives():
    """The bytes of every tensor this rank receives through torch.distributed's point-to-point and
    gather calls (the ones `gather_object` makes inside torch included) while the block runs."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    received: list[int] = []

    def size_of(tensors) -> int:
        tensors = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    receiving_arguments = {"recv": (0, "tensor"), "gather": (1, "gather_list"), "all_gather": (0, "tensor_list")}
    originals = {name: getattr(c10d, name) for name in receiving_arguments}

    def recording(name):
        position, keyword = receiving_arguments[name]

        def call(*args, **kwargs):
            tensors = args[position] if len(args) > position else kwargs.get(keyword)
            if tensors is not None:
                received.append(size_of(tensors))
            return originals[name](*args, **kwargs)

        return call

    for name in receiving_arguments:
        setattr(c10d, name, recording(name))
        setattr(dist, name, getattr(c10d, name))
    try:
        yield received
    finally:
        for name, original in originals.items():
            setattr(c10d, name, original)
            setattr(dist, name, original)


def main(argv=None) -> None:
    args = parse_args(argv)
    from safetensors.torch import save_file

    from vlpdist.config import load_config
    from vlpdist.parallel.engine import consolidated_state_dict, device_of, init_distributed
    from vlpdist.train.checkpoint import save_checkpoint
    from vlpdist.train.state import TrainState

    info = init_distributed(120)
    for variant in args.variants.split(","):
        config = load_config(TINY_CONFIG, [f"model.lm_name={args.lm}", f"train.ep_size={EP_SIZE}"])
        engine = build_bf16_engine(config, info, *VARIANTS[variant])
        train_steps(engine, info)
        out = args.out / variant
        save_checkpoint(engine, out / "checkpoints", TrainState(step=STEPS), keep=1, exclude_frozen=config.model.freeze_lm,
                        data_plan={}, device=device_of(info))
        save_file(local_expert_masters(engine), str(out / f"rank{info.rank}_experts.safetensors"))
        with recorded_receives() as received:
            live = consolidated_state_dict(engine.module, EP_SIZE, include_lm=not config.model.freeze_lm)
        if info.is_main:
            save_file({name: tensor.contiguous() for name, tensor in live.items()}, str(out / "live_fp32.safetensors"))
            (out / "rank0_received_bytes.json").write_text(json.dumps(received))
            print(f"{variant}: {type(engine.optimizer).__name__}, {len(live)} tensors", flush=True)


if __name__ == "__main__":
    main()
