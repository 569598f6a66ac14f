"""Offline consolidation: a vlpdist DeepSpeed checkpoint folder -> the consolidated fp32 state the
live export writes (`engine.consolidated_state_dict`), in one process, without ranks or GPUs.

DeepSpeed's own `zero_to_fp32.py`, which it copies beside the checkpoints, refuses our MoE
checkpoints (DeepSpeed #5716: it takes `layer_*_expert_*_model_states.pt` for a ZeRO-3 shard), and
it would not name the experts by global id anyway. This module reads the files itself.

What one step folder holds (ZeRO 1 or 2, DeepSpeed MoE, one model-parallel rank, W ranks):

    mp_rank_00_model_states.pt
        rank 0's module state without the experts ("module", in the training dtype), the shapes of
        the optimized params per optimizer group ("param_shapes"; MoE groups under rank 0's local
        expert ids), the experts per MoE layer ("num_experts") and the DeepSpeed config ("ds_config").
    layer_<L>_expert_<E>_mp_rank_00_model_states.pt
        expert E of MoE layer L, its keys already under the GLOBAL id E, in the training dtype.
    [bf16_]zero_pp_rank_<R>_mp_rank_00_optim_states.pt
        rank R's ZeRO partitions: per optimizer group a flat fp32 vector
        ("single_partition_of_fp32_groups") and where each param's fragment lies in it
        ("param_slice_mappings": name -> (start, numel)); "partition_count" per group.

In an fp32 run the module files hold the weights themselves. In a bf16/fp16 run they hold the
rounded half-precision copies, so the fp32 master weights are rebuilt from the optimizer shards:
a dense group is partitioned over all W ranks, an MoE group (named `ep_size_<ep>`) only over its
expert-data-parallel group, the W/ep ranks r with the same r % ep (DeepSpeed's layout, checked
against "partition_count"), each of which holds the local experts of expert-parallel rank r % ep.
Concatenating a param's fragments in rank order within its group gives the whole flat param.

A frozen LM left out of the checkpoint (`exclude_frozen_parameters`) is left out here too: the
state has `lm.*` only when LM params were optimized, as the live export (`include_lm`). DeepSpeed
drops every frozen param under that flag, not only the LM's: vlpdist freezes none outside the LM
by default, but with `align.learn_temperature=false` the checkpoint (and so this state) lacks the
fixed ITC temperature, which the live export has.

Trust: every `.pt` file is a pickle, so it can only be read with `torch.load`; DeepSpeed offers no
other format for ZeRO 1/2. All of them are read with `weights_only=True`. The module files need
nothing more. The optimizer shards pickle three plain DeepSpeed classes (the fragment address
dataclass, the ZeRO stage enum, the loss-scaler object), which are allowed by name for those
loads (`torch.serialization.safe_globals`); any other class in a file is refused, so reading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlpdist.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from vlpdist.errors import UserError
from vlpdist.parallel.expert_state import local_to_global_expert_state
from vlpdist.parallel.checkpoint_files import TAG_PREFIX, checkpoint_problem, list_checkpoints, read_manifest

if TYPE_CHECKING:
    from vlpdist.config import Config

# The consolidated export's weights, written here and by the live export (`vlpdist.train.run_end`).
EXPORT_WEIGHTS = "model_fp32.safetensors"
MODULE_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
OPTIMIZER_SHARD = re.compile(r"^(bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_00_optim_states\.pt$")
MOE_GROUP_NAME = re.compile(r"^ep_size_(?P<ep_size>\d+)$")
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
HOW_TO_EXPORT = "HOW_TO_EXPORT.txt"
FP32_SOURCES = ("auto", "module", "optimizer")


@dataclass
class ConsolidatedCheckpoint:
    """The consolidated state of one step folder and what the export records about it."""

    folder: Path
    step: int
    precision: str
    """The run's training precision: fp32, bf16 or fp16."""
    fp32_source: str
    """Where the trainable params came from: `module` (the module files) or `optimizer` (the ZeRO fp32 masters)."""
    state: dict[str, torch.Tensor]
    """Every param and buffer, fp32 on CPU, experts by global id; `lm.*` only when the LM was trained."""

    @property
    def includes_lm(self) -> bool:
        return any(name.startswith("lm.") for name in self.state)

    @property
    def clip_dim(self) -> int:
        return self.state["mapper.input_proj.weight"].shape[1]


def resolve_checkpoint_folder(path: str | Path) -> Path:
    """The step folder to consolidate: `path` itself when it is one (refused unless its manifest
    matches its files), or the newest usable `step_*` folder in a `checkpoints/` folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint folder {path} does not exist")
    is_step_folder = path.name.startswith((TAG_PREFIX, ".tmp_")) or any(path.glob("*_model_states.pt"))
    if is_step_folder:
        problem = checkpoint_problem(path)
        if problem is not None:
            raise UserError(f"checkpoint {path} is not usable: {problem}")
        return path
    tags = list_checkpoints(path)
    if not tags:
        raise UserError(f"{path} holds no DeepSpeed checkpoint (neither a step_* folder nor a checkpoints/ folder with one)")
    skipped = []
    for tag in tags:  # newest first: a damaged newest one falls back to the previous, as a resume does
        problem = checkpoint_problem(path / tag)
        if problem is None:
            if skipped:
                print(f"skipped {'; '.join(skipped)}; using {tag}", flush=True)
            return path / tag
        skipped.append(f"{tag} ({problem})")
    raise UserError(f"no usable checkpoint in {path}: {'; '.join(skipped)}")


def load_deepspeed_file(path: Path) -> dict:
    """One DeepSpeed `.pt` file, unpickled with `weights_only=True` (see the module docstring)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing")
    try:
        with torch.serialization.safe_globals([fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file is the user's to fix
        raise UserError(f"{path} is not a readable DeepSpeed checkpoint file: {str(err).strip().splitlines()[0]}") from None


def training_precision(model_states: dict) -> str:
    ds_config = model_states.get("ds_config") or {}
    for precision in ("bf16", "fp16"):
        if (ds_config.get(precision) or {}).get("enabled"):
            return precision
    return "fp32"


def _experts_per_rank(num_experts: list[int], ep_size: int) -> int:
    # vlpdist builds every MoE layer with model.num_experts, so one count serves all layers.
    if len(set(num_experts)) != 1 or num_experts[0] % ep_size:
        raise UserError(f"experts per MoE layer {num_experts} do not split evenly over ep_size {ep_size}: not a vlpdist checkpoint")
    return num_experts[0] // ep_size


def read_module_state(folder: Path, model_states: dict) -> dict[str, torch.Tensor]:
    """Dense params and buffers from the module file, every expert from its own file (global ids), in the training dtype."""
    state = {key.removeprefix("module."): value for key, value in model_states["module"].items()}
    for layer, experts in enumerate(model_states.get("num_experts") or []):
        for expert in range(experts):
            state.update(load_deepspeed_file(folder / EXPERT_STATES.format(layer=layer, expert=expert)))
    return state


def read_optimizer_shards(folder: Path, world_size: int) -> list[dict]:
    """Every rank's ZeRO optimizer state, in rank order."""
    found = {int(match["rank"]): name for name in (path.name for path in folder.iterdir()) if (match := OPTIMIZER_SHARD.match(name))}
    if sorted(found) != list(range(world_size)):
        raise UserError(f"checkpoint {folder} has optimizer shards of ranks {sorted(found)}, expected 0..{world_size - 1}")
    return [load_deepspeed_file(folder / found[rank])["optimizer_state_dict"] for rank in range(world_size)]


def _group_ep_size(group: dict) -> int:
    """1 for a dense optimizer group; the expert-parallel size for an MoE one (DeepSpeed names it `ep_size_<ep>`)."""
    if not group.get("moe"):
        return 1
    match = MOE_GROUP_NAME.match(str(group.get("name")))
    if match is None:
        raise UserError(f"MoE optimizer group named {group.get('name')!r}, expected ep_size_<n>: not a DeepSpeed MoE checkpoint")
    return int(match["ep_size"])


def read_fp32_master_weights(folder: Path, model_states: dict, world_size: int) -> dict[str, torch.Tensor]:
    """The ZeRO fp32 master copy of every optimized param, whole, experts by global id (module docstring)."""
    shards = read_optimizer_shards(folder, world_size)
    groups = shards[0]["base_optimizer_state"]["param_groups"]
    param_shapes = model_states["param_shapes"]
    if len(groups) != len(param_shapes):
        raise UserError(f"checkpoint {folder}: {len(groups)} optimizer groups but param shapes for {len(param_shapes)}")
    masters: dict[str, torch.Tensor] = {}
    for group_index, shapes in enumerate(param_shapes):
        ep_size = _group_ep_size(groups[group_index])
        for ep_rank in range(ep_size):
            owners = [rank for rank in range(world_size) if rank % ep_size == ep_rank]
            fragments: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
            for rank in owners:
                shard = shards[rank]
                if shard["partition_count"][group_index] != len(owners):
                    raise UserError(
                        f"checkpoint {folder}: optimizer group {group_index} is split {shard['partition_count'][group_index]} ways on "
                        f"rank {rank}, expected {len(owners)} (ranks r with r % {ep_size} == {ep_rank})"
                    )
                flat = shard["single_partition_of_fp32_groups"][group_index]
                for name, address in shard["param_slice_mappings"][group_index].items():
                    if name not in fragments:
                        raise UserError(f"checkpoint {folder}: rank {rank} holds a fragment of {name}, which group {group_index} lacks")
                    fragments[name].append(flat.narrow(0, address.start, address.numel))
            group_masters = {}
            for name, shape in shapes.items():
                flat_param = torch.cat(fragments[name]) if fragments[name] else torch.empty(0)
                if flat_param.numel() != torch.Size(shape).numel():
                    raise UserError(f"checkpoint {folder}: the optimizer shards hold {flat_param.numel()} values of {name}, shape {tuple(shape)}")
                group_masters[name] = flat_param.view(shape).clone()
            if ep_size > 1:
                group_masters = local_to_global_expert_state(
                    group_masters, ep_rank, _experts_per_rank(model_states["num_experts"], ep_size)
                )
            masters.update(group_masters)
    return masters


def consolidate_checkpoint(path: str | Path, fp32_source: str = "auto") -> ConsolidatedCheckpoint:
    """The consolidated fp32 state of a step folder, or of the newest usable one in a `checkpoints/` folder.

    `fp32_source`: `auto` takes the trainable params from the module files in an fp32 run and from
    the optimizer shards otherwise; `module` / `optimizer` force one (in an fp32 run both give the
    same tensors, which the tests check)."""
    if fp32_source not in FP32_SOURCES:
        raise ValueError(f"fp32_source is {fp32_source!r}; expected one of {FP32_SOURCES}")
    folder = resolve_checkpoint_folder(path)
    manifest, _ = read_manifest(folder)
    model_states = load_deepspeed_file(folder / MODULE_STATES)
    if "module" not in model_states or "param_shapes" not in model_states:
        raise UserError(f"{folder / MODULE_STATES} is not a DeepSpeed ZeRO 1/2 model state file")
    precision = training_precision(model_states)
    source = fp32_source if fp32_source != "auto" else ("module" if precision == "fp32" else "optimizer")
    state = read_module_state(folder, model_states)
    if source == "optimizer":
        masters = read_fp32_master_weights(folder, model_states, manifest["world_size"])
        missing = sorted(set(masters) - set(state))
        if missing:
            raise UserError(f"checkpoint {folder}: optimized params {missing[:3]} are in no module file")
        state.update(masters)
    trained_lm = any(name.startswith("lm.") for shapes in model_states["param_shapes"] for name in shapes)
    state = {name: tensor.float().contiguous() for name, tensor in state.items() if trained_lm or not name.startswith("lm.")}
    return ConsolidatedCheckpoint(folder, manifest["train_state"]["step"], precision, source, state)


def write_consolidated_export(consolidated: ConsolidatedCheckpoint, config: Config, out_dir: str | Path) -> Path:
    """Write what the live export writes (`run_end.export_consolidated`) into `out_dir`: the weights
    as `model_fp32.safetensors`, the run's config, and `export.json` (which also names the source
    checkpoint); each file atomically, so `--evaluate-export` and the fold read it alike."""
    from safetensors.torch import save

    from vlpdist.config import save_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / EXPORT_WEIGHTS, save(consolidated.state))
    save_config(config, out_dir)
    atomic_write_json(out_dir / "export.json", {
        "clip_dim": consolidated.clip_dim, "step": consolidated.step, "includes_lm": consolidated.includes_lm,
        "consolidated_from": str(consolidated.folder.resolve()), "precision": consolidated.precision,
        "fp32_source": consolidated.fp32_source,
    })
    return out_dir


def replace_deepspeed_consolidation_script(folder: str | Path) -> Path:
    """Remove the `zero_to_fp32.py` (and its wrapper `zero_to_torch.py`) DeepSpeed copies into the
    checkpoint folder on every save, which fails on our MoE checkpoints, and write a
    `HOW_TO_EXPORT.txt` naming the command to run instead. Returns the note's path."""
    folder = Path(folder)
    for script in DEEPSPEED_SCRIPTS:
        (folder / script).unlink(missing_ok=True)
    return atomic_write_text(
        folder / HOW_TO_EXPORT,
        "These are vlpdist DeepSpeed MoE checkpoints. DeepSpeed's zero_to_fp32.py does not read them\n"
        "(DeepSpeed #5716) and was removed. To get the consolidated fp32 model (all experts by global id)\n"
        "and the folded inference mapper, run from the vlpdist checkout:\n\n"
        f"    python -m launcher.export --checkpoint {folder.resolve()} --out <export folder>\n\n"
        "Given this folder it takes the newest usable step_* checkpoint; give a step_* folder to pick one.\n"
        "It needs no GPU and starts no ranks.\n",
    )
