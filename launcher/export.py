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
fold on random inputs (a relative error above `--max-fold-error` is refused, nothing written), and
writes the self-contained export into `--out` (`vlpdist.models.export_bundle`): the folded mapper
(`mapper.safetensors` + `mapper_config.json`), the LM and tokenizer as trained (`lm/`: a tuned LM
always, a frozen local folder by default; a frozen hub name is recorded with its revision),
bottleneck tokens and alignment heads (`extras.safetensors`), the CLIP the features came from
(`clip/`, from the config's `process.clip_model` / `process.clip_pretrained`; a local checkpoint is
copied by default), `config.yaml`, and the manifest `export.json` with every file's size. The
folder is staged and swapped into place, so `--out` is complete or untouched; `--out` must be new,
empty, or an earlier export (`vlpdist.atomic.replace_output_dir`): any other folder is refused.
`vlpdist.models.load_exported_captioner(<out>)` loads it; `python -m launcher.caption --export <out>
...` captions images with it. The model config comes from `--config`, else from the `config.yaml`
of the run folder the checkpoint sits in, its relative paths resolved against the directory the
run was started from (`vlpdist.config.load_run_config`), so any working directory works.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from vlpdist.errors import UserError, exit_on_user_error
from vlpdist.models.export_bundle import MANIFEST_FILE

MAPPER_PREFIX = "mapper."
FOLD_CHECK_SAMPLES = 16
# The exact fold is the MoE mapper's algebra rewritten, so only fp32 rounding separates them: the demo's
# trained mapper folds to ~1e-7 relative error. A wrong fold (an expert misplaced, a bias dropped, gates
# mis-summed) is off by 1e-2 and more. 1e-4 sits a thousand times above rounding and far below any of those.
DEFAULT_MAX_FOLD_ERROR = 1e-4
WRITER = "launcher.export"


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
def static_fold_from_features(exact, config, calibration_samples: int):
    """(static fold, its relative error against the exact fold on held-out samples): the gates are
    averaged over the first `calibration_samples` training samples of the run's feature shards."""
    from vlpdist.data.feature_shards import iterate_heldout, list_feature_shards, split_heldout
    from vlpdist.models.fold import fold_mapper_static, measure_static_fold_error

    features = Path(config.train.features_dir) if config.train.features_dir else Path(config.root) / "features"
    train_shards, heldout_shards = split_heldout(list_feature_shards(features), config.train.heldout_shards)

    def clip_of(shards, count):
        batches = [batch["clip"] for batch in iterate_heldout(shards, 256, count)]
        if not batches:
            raise UserError(f"--static-fold needs feature shards with samples in {features}")
        return torch.cat(batches)

    static = fold_mapper_static(exact, clip_of(train_shards, calibration_samples))
    heldout = clip_of(heldout_shards or train_shards, 512)
    return static, measure_static_fold_error(exact, static, heldout)


def relative_fold_error(moe_mapper, folded, clip_dim: int, samples: int = FOLD_CHECK_SAMPLES) -> float:
    """||folded(x) - moe(x)|| / ||moe(x)|| on standard-normal CLIP inputs (both in eval mode)."""
    clip_BC = torch.randn(samples, clip_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a measurement: no graph through the mapper's parameters
        expected = moe_mapper.eval()(clip_BC)[0]
        return float((folded(clip_BC)[0] - expected).norm() / expected.norm())


def check_fold_error(fold_error: float, tolerance: float) -> None:
    """Refuse to export a fold whose relative error against the MoE mapper exceeds `tolerance`."""
    if not fold_error <= tolerance:  # NaN too
        raise UserError(f"the folded mapper differs from the MoE mapper by {fold_error:.2e} (relative), above "
                        f"--max-fold-error {tolerance:.0e}: the fold is wrong for this checkpoint; nothing was written")


def refuse_out_holding_checkpoint(checkpoint: Path, out: Path) -> None:
    """`--out` is replaced as a whole: it must not be, or hold, what is being exported."""
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {out} holds --checkpoint {checkpoint} and would be replaced by the export: choose another --out")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    from data_ingest.process.clip_model import SHIPPED_CLIP_CONFIG_DIR
    from vlpdist.atomic import refuse_foreign_output, replace_output_dir
    from vlpdist.config import load_run_config, save_config
    from vlpdist.data.provenance import find_run_provenance
    from vlpdist.models.export_bundle import write_export_bundle
    from vlpdist.models.fold import fold_mapper, save_folded_mapper
    from vlpdist.models.mapper import build_mapper

    parser = argparse.ArgumentParser(prog="launcher.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="consolidated fp32 state dict (.safetensors or torch file), or a DeepSpeed checkpoint folder")
    parser.add_argument("--out", required=True, help="export folder: new, empty, or an earlier export (then replaced as a whole, "
                                                     "atomically); any other folder is refused")
    parser.add_argument("--config", default=None, help="run config (default: config.yaml of the checkpoint's run)")
    parser.add_argument("--copy-lm", action=argparse.BooleanOptionalAction, default=None,
                        help="copy a frozen LM and tokenizer into the export (default: a local folder is copied, a hub name "
                             "is recorded with its revision); --no-copy-lm names a local folder by absolute path instead")
    parser.add_argument("--copy-clip", action=argparse.BooleanOptionalAction, default=True,
                        help="copy a local CLIP checkpoint into the export (default); --no-copy-clip names it by absolute path and SHA-256")
    parser.add_argument("--max-fold-error", type=float, default=DEFAULT_MAX_FOLD_ERROR, metavar="REL",
                        help=f"refuse an exact fold whose relative error against the MoE mapper exceeds this (default {DEFAULT_MAX_FOLD_ERROR:.0e})")
    parser.add_argument("--static-fold", type=int, default=0, metavar="N",
                        help="write a static fold instead (one dense layer per block from the gates' mean over the first N "
                             "training samples' CLIP embeddings): fewer parameters, approximate; its error is printed")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    refuse_out_holding_checkpoint(checkpoint, out)
    refuse_foreign_output(out, WRITER, "--out")  # before the work: replace_output_dir checks it again at the end
    consolidated = None
    if checkpoint.is_dir():
        from vlpdist.parallel.consolidate import MODULE_STATES, consolidate_checkpoint

        consolidated = consolidate_checkpoint(checkpoint)
        config = load_run_config(args.config or find_run_config(consolidated.folder / MODULE_STATES), args.overrides)
        full_state = consolidated.state
    else:
        full_state = read_consolidated_state(checkpoint)
        config = load_run_config(args.config or find_run_config(checkpoint), args.overrides)
    state = mapper_state(full_state)
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
    # The exact fold is checked; a static fold is an approximation by choice and its error only reported.
    check_fold_error(fold_error, args.max_fold_error)
    static_note = ""
    if args.static_fold > 0:
        folded, fold_error = static_fold_from_features(folded, config, args.static_fold)
        static_note = f" (static: gates' mean over {args.static_fold} training samples; error on held-out samples)"
    with replace_output_dir(out, WRITER, "--out") as staging:
        meta = {"source_checkpoint": str(checkpoint.resolve()), "fold_relative_error": fold_error,
                "fold_tolerance": args.max_fold_error}
        if consolidated is not None:
            from vlpdist.parallel.consolidate import write_consolidated_export

            # The consolidated fp32 files too, so `launcher/train.py --evaluate-export <out>` reloads it at any ep_size.
            write_consolidated_export(consolidated, config, staging)
            meta.update(json.loads((staging / MANIFEST_FILE).read_text()))
        else:
            save_config(config, staging)
        save_folded_mapper(folded, staging, {"model": asdict(config.model), "fold_relative_error": fold_error})
        manifest = write_export_bundle(staging, config, full_state, clip_dim, copy_lm=args.copy_lm, copy_clip=args.copy_clip,
                                       clip_config_dirs=[SHIPPED_CLIP_CONFIG_DIR], meta=meta,
                                       provenance=find_run_provenance(checkpoint))
    if consolidated is not None:
        print(f"consolidated {consolidated.folder} (step {consolidated.step}, {consolidated.precision} run, fp32 weights "
              f"from the {consolidated.fp32_source} files, {len(consolidated.state)} tensors) into {out}", flush=True)
    clip = manifest["clip"]
    if clip["embed_dim"] is not None and clip["embed_dim"] != clip_dim:
        print(f"warning: CLIP {clip['model_name']!r} embeds into {clip['embed_dim']} dims but the mapper reads {clip_dim}: "
              "these features did not come from it; the caption command will refuse this export (set process.clip_model / "
              "process.clip_pretrained to the CLIP that made the features)", flush=True)
    report = {
        "moe_params": count_parameters(moe_mapper),
        "folded_params": count_parameters(folded),
        "fold_relative_error": fold_error,
        "fold_tolerance": args.max_fold_error,
        "out": str(out),
        "lm": manifest["lm"]["source"],
        "files": len(manifest["files"]),
    }
    lm_note = "the LM as trained, bundled" if manifest["lm"]["source"] == "bundled" else f"frozen LM {manifest['lm']['name']}"
    print(
        f"MoE mapper {report['moe_params']:,} params -> folded dense mapper {report['folded_params']:,} params; "
        f"fold relative error {fold_error:.2e}{static_note}; {lm_note}; CLIP {clip['model_name']} ({clip['pretrained'] or 'random'}); "
        f"written to {out}"
    )
    return report


if __name__ == "__main__":
    main()
