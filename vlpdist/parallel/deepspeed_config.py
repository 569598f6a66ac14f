"""The DeepSpeed JSON, generated from `TrainConfig` (never kept by hand as a second truth)."""

from __future__ import annotations

from vlpdist.config import TrainConfig
from vlpdist.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def check_train_config(train: TrainConfig, world_size: int) -> None:
    """Value checks the type system cannot express, against the world size of this launch."""
    if train.zero_stage not in (1, 2):
        raise UserError(f"config key 'train.zero_stage' is {train.zero_stage}; DeepSpeed MoE supports ZeRO stage 1 or 2")
    if train.precision not in PRECISIONS:
        raise UserError(f"config key 'train.precision' is {train.precision!r}; expected one of {list(PRECISIONS)}")
    if train.ep_size < 1 or world_size % train.ep_size != 0:
        raise UserError(f"config key 'train.ep_size' is {train.ep_size}; it must divide the world size {world_size}")
    for key in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "warmup_steps", "checkpoint_every",
                "keep_checkpoints", "log_every", "max_consecutive_nan_steps", "eval_max_samples"):
        if getattr(train, key) < 1:
            raise UserError(f"config key 'train.{key}' must be >= 1")
    if train.num_workers < 0 or train.caption_log_every < 0:
        raise UserError("config keys 'train.num_workers', 'train.caption_log_every' must be >= 0")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise UserError("config key 'train.min_lr_ratio' must be in [0, 1]")
    if train.dist_timeout_s <= 0 or train.rendezvous_timeout_s <= 0:
        raise UserError("config keys 'train.dist_timeout_s', 'train.rendezvous_timeout_s' must be > 0")


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """`auto` is bf16 on GPU and fp32 on CPU; half precision on CPU is refused."""
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if precision in ("bf16", "fp16") and not on_gpu:
        raise UserError(f"config key 'train.precision' is {precision!r} but no GPU is present; use auto or fp32")
    return precision


def build_deepspeed_config(train: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The full DeepSpeed config dict for `deepspeed.initialize(config=...)`."""
    check_train_config(train, world_size)
    precision = resolve_precision(train.precision, on_gpu)
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {
            "stage": train.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": on_gpu,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        # A non-finite loss makes non-finite gradients; DeepSpeed then skips the optimizer step on
        # every rank (its grad-norm check is a collective), which is how NaN batches are skipped.
        # fp16 and fp32 check always; bf16 only when asked.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # torch's AdamW, fused (DeepSpeed passes `fused` on to torch.optim.AdamW when
                # `torch_adam` is set), on every device: one pass over params, grads and moments
                # instead of one per elementwise op (the 13.6 M-parameter GPT-2 mapper's step:
                # 84 -> 57 ms on 2 cores), and a kernel torch ships for CUDA. DeepSpeed's own FusedAdam,
                # its default, is an op it compiles at engine start (nvcc, Python headers and ninja on
                # PATH, about a minute), which a bare GPU machine cannot do.
                "torch_adam": True,
                "fused": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.max_steps,
                "warmup_num_steps": train.warmup_steps,
                "warmup_type": "linear",
                # The first step runs at lr / warmup_steps, not 0 (see build_engine's scheduler.step(0)).
                "warmup_min_ratio": 1.0 / max(train.warmup_steps, 2),
                "cos_min_ratio": train.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
