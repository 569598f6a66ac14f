"""Fold and export the trained MoE mapper: `python -m launcher.export --checkpoint <checkpoint> --out <dir>`.

`--checkpoint` is either
- a consolidated fp32 file (every expert under its global id; `.safetensors`, or a torch file
  loaded with `weights_only=True`), e.g. the `<run>/export/model_fp32.safetensors` training writes; or
- a DeepSpeed checkpoint folder, `<run>/checkpoints/step_N` or `<run>/checkpoints` (then the newest
  usable step): it is consolidated offline in this process, no ranks or GPU
  (`vlpdist.parallel.consolidate`), and written into `--out` as the live export would write it
  (`model_fp32.safetensors`, `config.yaml`, `export.json`), so `launcher/train.py --evaluate-export
  <out>` reloads it at any ep_size.
Then it rebuilds the MoE mapper at ep_size 1, folds it into the dense inference mapper, checks the
fold on random inputs, and writes `mapper.safetensors` + `mapper_config.json` into `--out`. The
model config comes from `--config`, else from the `config.yaml` of the run folder the checkpoint sits in.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from vlpdist.errors import UserError, exit_on_user_error

MAPPER_PREFIX = "mapper."
FOLD_CHECK_SAMPLES = 16


def read_consolidated_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A consolidated state dict from safetensors or a torch file (no unpickling); a DeepSpeed `module.` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"checkpoint {path} is not a readable state dict: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "module" in state and isinstance(state["module"], dict):
        state = state["module"]
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} does not hold a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def find_run_config(checkpoint: Path) -> Path:
    """The `config.yaml` in the checkpoint's folder or one of its three parents (the run folder)."""
    for folder in [checkpoint.parent, *checkpoint.parent.parents][:4]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise UserError(f"no config.yaml found beside or above {checkpoint}; pass --config")


def mapper_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mapper's entries of a captioner state dict, prefix stripped."""
    mapper = {key[len(MAPPER_PREFIX) :]: value for key, value in state.items() if key.startswith(MAPPER_PREFIX)}
    if not mapper:
        raise UserError(f"checkpoint holds no '{MAPPER_PREFIX}*' parameters: not a vlpdist captioner state")
    return mapper


def count_parameters(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


@torch.no_grad()
def relative_fold_error(moe_mapper, folded, clip_dim: int, samples: int = FOLD_CHECK_SAMPLES) -> float:
    """||folded(x) - moe(x)|| / ||moe(x)|| on standard-normal CLIP inputs (both in eval mode)."""
    clip_BC = torch.randn(samples, clip_dim, generator=torch.Generator().manual_seed(0))
    expected = moe_mapper.eval()(clip_BC)[0]
    return float((folded(clip_BC)[0] - expected).norm() / expected.norm())


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from vlpdist.config import load_config
    from vlpdist.models.fold import fold_mapper, save_folded_mapper
    from vlpdist.models.mapper import build_mapper

    parser = argparse.ArgumentParser(prog="launcher.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="consolidated fp32 state dict (.safetensors or torch file), or a DeepSpeed checkpoint folder")
    parser.add_argument("--out", required=True,
                        help="folder for mapper.safetensors + mapper_config.json (and the consolidated files, from a checkpoint folder)")
    parser.add_argument("--config", default=None, help="run config (default: config.yaml of the checkpoint's run)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        from vlpdist.parallel.consolidate import MODULE_STATES, consolidate_checkpoint, write_consolidated_export

        consolidated = consolidate_checkpoint(checkpoint)
        config = load_config(args.config or find_run_config(consolidated.folder / MODULE_STATES), args.overrides)
        write_consolidated_export(consolidated, config, args.out)
        print(f"consolidated {consolidated.folder} (step {consolidated.step}, {consolidated.precision} run, fp32 weights "
              f"from the {consolidated.fp32_source} files, {len(consolidated.state)} tensors) into {args.out}", flush=True)
        state = mapper_state(consolidated.state)
    else:
        state = mapper_state(read_consolidated_state(checkpoint))
        config = load_config(args.config or find_run_config(checkpoint), args.overrides)
    if config.model.mapper != "moe":
        raise UserError(f"model.mapper is {config.model.mapper!r}: only the MoE mapper folds")
    if "input_proj.weight" not in state:
        raise UserError("checkpoint has no mapper.input_proj.weight: not an MoE mapper state")
    clip_dim = state["input_proj.weight"].shape[1]
    width = state["input_proj.weight"].shape[0] // config.model.prefix_length
    moe_mapper = build_mapper(config.model, clip_dim, width, ep_size=1).float()
    try:
        moe_mapper.load_state_dict({key: value.float() for key, value in state.items()})
    except RuntimeError as err:
        raise UserError(f"checkpoint does not fit model config: {str(err).splitlines()[-1].strip()}") from None
    folded = fold_mapper(moe_mapper)
    fold_error = relative_fold_error(moe_mapper, folded, clip_dim)
    save_folded_mapper(folded, args.out, {"model": asdict(config.model), "fold_relative_error": fold_error})
    report = {
        "moe_params": count_parameters(moe_mapper),
        "folded_params": count_parameters(folded),
        "fold_relative_error": fold_error,
        "out": str(args.out),
    }
    print(
        f"MoE mapper {report['moe_params']:,} params -> folded dense mapper {report['folded_params']:,} params; "
        f"fold relative error {fold_error:.2e}; written to {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
