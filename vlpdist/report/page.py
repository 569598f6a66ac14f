"""The run report: `build_report(path)` -> one self-contained HTML page (thumbnails as data URIs,
hand-written inline SVG, no script, no network), `write_report` writes it atomically.

Sections and where they come from (a missing source gives a section that says what is missing
and why, never an exception):
- ingestion: `<root>/ingest_summary.json` (download) and `<root>/features/process_summary.json`;
- filter: `<root>/features/NNNNN_decisions.parquet` (every raw sample's CLIP score and status; two
  columns read) with the threshold from the config, and a fixed-seed grid of dropped and kept
  samples, their images read as single members of `<root>/raw/NNNNN.tar`, a kept sample's synthetic
  captions from its feature shard's `json` member;
- labels: `label_vocabulary.json` and the labels of a fixed-seed sample of feature samples;
- training: `<run>/metrics.jsonl` (every step's loss terms, lr, grad norm; torn lines skipped) and
  `<run>/tb` (samples/s, expert load, the start step of every launch = resumes) through
  TensorBoard's own EventAccumulator;
- held-out and retrieval: `<run>/eval.json` (examples, scores against baselines, R@K, top-5);
- bank: the `align/*` and `geodesic/*` TensorBoard scalars (when alignment is on), with eval.json's geodesic trust count;
- ablation: `ablation.json` under the root.

A page carries `GENERATOR_META` in its head: `write_report` replaces a file only when it is such a
page, so a report path that names anything else is refused, never overwritten.
`build_evaluation_report` is the held-out and retrieval sections alone, for one evaluation's result
(`launcher.evaluate --report`).

Bound: every grid is a fixed number of thumbnails (<= 96 px JPEG), every curve <= 400 points,
label bars <= 30, tables <= 50 rows, captions cut at 200 characters, at most 64 decision files and
16 shards' headers read: the page stays under 2 MB (a few hundred KB in practice) for any run.
"""

from __future__ import annotations

import html
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from vlpdist.errors import UserError
from vlpdist.report import svg
from vlpdist.report.samples import member_index, members_by_key, read_members, thumbnails_for_keys

SECTIONS = (("ingestion", "Ingestion"), ("filter", "Caption filter"), ("labels", "Object labels"),
            ("training", "Training"), ("heldout", "Held-out captions"), ("retrieval", "Retrieval"),
            ("bank", "Memory bank and geodesics"), ("ablation", "Ablation"))
PAGE_BOUND_BYTES = 2 * 2**20
GRID_EXAMPLES = 8  # dropped and kept each
HELDOUT_EXAMPLES = 8
MAX_DECISION_FILES = 64
LABEL_SAMPLES = 2000
MAX_LABEL_BARS = 30
MAX_TABLE_ROWS = 50
MAX_TEXT = 200
SEED = 0
CAPTION_COLUMNS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
TB_SIZE_GUIDANCE = 2000  # scalars kept per tag (TensorBoard's reservoir sampling): bounded memory and time
GENERATOR = "vlpdist.report"
GENERATOR_META = f'<meta name="generator" content="{GENERATOR}">'
MARKER_WINDOW_BYTES = 512  # the marker sits right after <meta charset>, so a page is recognised from its first bytes


class Missing(Exception):
    """A section has nothing to show; the message says why."""


@dataclass
class RunFiles:
    """Where a run's files are: the data root (ingestion) and the training run folder; either may be None."""

    root: Path | None
    run_dir: Path | None
    config: object | None = None
    notes: list[str] = field(default_factory=list)
    _scalars: dict | None = None

    @property
    def features(self) -> Path | None:
        return self.root / "features" if self.root else None

    @property
    def raw(self) -> Path | None:
        return self.root / "raw" if self.root else None


def _load_config(path: Path):
    from vlpdist.config import load_run_config

    try:
        return load_run_config(path)
    except Exception:  # a config of another version still gives the page the rest
        return None


def locate(path: Path) -> RunFiles:
    """A data root (config.yaml naming train.output_dir, or raw/ + features/) or a run folder
    (metrics.jsonl, tb/, eval.json): the other one is found through the config."""
    path = Path(path)
    config = _load_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
    is_run = any((path / name).exists() for name in ("metrics.jsonl", "tb", "eval.json", "checkpoints"))
    if is_run:
        root = Path(config.root) if config is not None and config.root else None
        if root is None or not root.is_dir():
            root = path.parent if (path.parent / "features").is_dir() else None
        return RunFiles(root, path, config)
    run_dir = Path(config.train.output_dir) if config is not None and config.train.output_dir else None
    if run_dir is not None and not run_dir.is_absolute():
        run_dir = path / run_dir
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        config = _load_config(run_dir / "config.yaml") or config
    return RunFiles(path, run_dir if run_dir is not None and run_dir.is_dir() else None, config)


def _text(value, limit: int = MAX_TEXT) -> str:
    text = str(value)
    return html.escape(text if len(text) <= limit else text[:limit] + "…")


def _read_json(path: Path | None, what: str) -> dict:
    if path is None or not path.is_file():
        raise Missing(f"no {what} ({path if path else 'no data root found'})")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise Missing(f"{path} is not readable JSON ({err})") from None


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows[:MAX_TABLE_ROWS])
    more = f"<p>{len(rows) - MAX_TABLE_ROWS} more rows not shown</p>" if len(rows) > MAX_TABLE_ROWS else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _image(uri: str | None, alt: str) -> str:
    if uri is None:
        return '<div class="noimage">image not found</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


# ---- sections ---------------------------------------------------------------------------------

def section_ingestion(run: RunFiles) -> str:
    download = _read_json(run.root / "ingest_summary.json" if run.root else None, "download summary (ingest_summary.json)")
    labels, values, colours = ["URL rows in", "downloaded"], [download["input_rows"], download["success"]], ["#1f77b4", "#2ca02c"]
    for reason, count in download.get("failures_by_reason", {}).items():
        labels.append(f"failed: {reason}"), values.append(count), colours.append("#d62728")
    note = ""
    process_path = run.features / "process_summary.json"
    if process_path.is_file():
        process = json.loads(process_path.read_text())
        labels += ["processed: written", "dropped by the filter"]
        values += [process.get("written", 0), process.get("dropped_by_filter", 0)]
        colours += ["#2ca02c", "#ff7f0e"]
        question_only = process.get("decisions", {}).get("question_only", 0)
        if question_only:  # written for their question alone: the filter dropped their caption
            labels.append("caption dropped, question kept"), values.append(question_only), colours.append("#ff7f0e")
        for reason, count in process.get("failed", {}).items():
            labels.append(f"processing failed: {reason}"), values.append(count), colours.append("#d62728")
    else:
        note = f"<p>No processing summary ({process_path}): only the download is shown.</p>"
    return svg.bar_chart(labels, values, "ingestion: rows by outcome", colours) + note


def _decision_rows(run: RunFiles) -> tuple[list[dict], int, int]:
    """(rows {shard, key, status, web_clip, verdict} of the sampled decision files, files read, files in all).
    verdict is the filter's on the web caption: "dropped" also for a sample written for its question
    alone (status written, web_kept false), "kept" for a written sample whose web caption was kept."""
    import pyarrow.parquet as pq

    files = sorted(run.features.glob("*_decisions.parquet")) if run.features and run.features.is_dir() else []
    if not files:
        raise Missing(f"no NNNNN_decisions.parquet in {run.features}")
    chosen = files if len(files) <= MAX_DECISION_FILES else sorted(random.Random(SEED).sample(files, MAX_DECISION_FILES))
    rows = []
    for path in chosen:
        columns = ["key", "status", "web_clip"] + (["web_kept"] if "web_kept" in pq.read_schema(path).names else [])
        shard = path.name.split("_", 1)[0]
        for row in pq.read_table(path, columns=columns).to_pylist():
            web_dropped = row["status"] == "dropped" or row["status"] == "written" and row.get("web_kept") is False
            verdict = "dropped" if web_dropped else "kept" if row["status"] == "written" else row["status"]
            rows.append({**row, "shard": shard, "verdict": verdict})
    return rows, len(chosen), len(files)


def section_filter(run: RunFiles) -> str:
    rows, read, total = _decision_rows(run)
    scored = [row for row in rows if row["web_clip"] is not None]
    groups = {"kept": [r["web_clip"] for r in scored if r["verdict"] == "kept"],
              "dropped": [r["web_clip"] for r in scored if r["verdict"] == "dropped"]}
    process = getattr(run.config, "process", None)
    threshold = process.clip_threshold if process is not None and process.filter == "clip" else None
    why = "" if threshold is not None else "<p>Threshold not marked: the filter was not the CLIP score (or no config).</p>"
    parts = [svg.histogram(groups, "web caption CLIP score, kept vs dropped", threshold), why,
             f"<p>{len(scored)} scored samples from {read} of {total} shards' decision files.</p>"]
    rng = random.Random(SEED)
    picks = {}
    for verdict in ("dropped", "kept"):
        candidates = [r for r in scored if r["verdict"] == verdict]
        picks[verdict] = sorted(rng.sample(candidates, min(GRID_EXAMPLES, len(candidates))), key=lambda r: r["web_clip"])
    chosen = picks["dropped"] + picks["kept"]
    images = thumbnails_for_keys(run.raw, [r["key"] for r in chosen])
    meta = _feature_meta(run, picks["kept"])
    captions = _raw_captions(run, chosen)
    for status, label in (("dropped", "Dropped"), ("kept", "Kept")):
        cells = []
        for row in picks[status]:
            info = meta.get(row["key"], {})
            synthetic = info.get("scores", {}).get("synthetic_captions") or []
            extra = "".join(f'<div class="synthetic">BLIP: {_text(c)}</div>' for c in synthetic[:2])
            caption = info.get("original_caption") or captions.get(row["key"], "")
            cells.append(f'<figure>{_image(images.get(row["key"]), row["key"])}<figcaption>{_text(caption)}'
                         f'<div class="score">score {row["web_clip"]:.3f}</div>{extra}</figcaption></figure>')
        parts.append(f"<h3>{label} (fixed-seed sample)</h3><div class=\"grid\">{''.join(cells) or 'none'}</div>")
    if process is not None and process.captioner:
        parts.append("<p>Synthetic captions of dropped samples are not recorded (only kept samples are written).</p>")
    return "".join(parts)


def _feature_meta(run: RunFiles, rows: list[dict]) -> dict[str, dict]:
    """{key: the feature sample's json} for these rows, one member read each."""
    out = {}
    by_shard: dict[str, list[str]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row["key"])
    for shard, keys in by_shard.items():
        path = run.features / f"{shard}.tar"
        if path.is_file():
            members = members_by_key(member_index(path), keys, (".json",))
            for name, data in read_members(path, list(members.values())).items():
                out[name.rsplit(".", 1)[0]] = json.loads(data)
    return out


def _raw_captions(run: RunFiles, rows: list[dict]) -> dict[str, str]:
    out = {}
    by_shard: dict[str, list[str]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row["key"])
    for shard, keys in by_shard.items():
        path = run.raw / f"{shard}.tar"
        if path.is_file():
            members = members_by_key(member_index(path), keys, (".txt",))
            out.update((name.rsplit(".", 1)[0], data.decode("utf-8", "replace"))
                       for name, data in read_members(path, list(members.values())).items())
    return out


def section_labels(run: RunFiles) -> str:
    vocabulary = _read_json(run.features / "label_vocabulary.json" if run.features else None, "label vocabulary")
    names = vocabulary["names"]
    shards = sorted(p for p in run.features.glob("*.tar") if p.stem.isdigit())
    if not shards:
        raise Missing(f"no feature shards in {run.features}")
    chosen = shards if len(shards) <= 16 else sorted(random.Random(SEED).sample(shards, 16))
    counts = [0] * len(names)
    samples = 0
    per_shard = max(1, LABEL_SAMPLES // len(chosen))
    for shard in chosen:
        index = member_index(shard)
        json_members = [m for name, m in index.items() if name.endswith(".json")]
        picked = json_members if len(json_members) <= per_shard else random.Random(SEED).sample(json_members, per_shard)
        for data in read_members(shard, picked).values():
            for label in json.loads(data).get("labels", []):
                if 0 <= label < len(names):
                    counts[label] += 1
            samples += 1
    order = sorted(range(len(names)), key=lambda i: -counts[i])[:MAX_LABEL_BARS]
    unseen = sum(1 for c in counts if c == 0)
    return (svg.bar_chart([names[i] for i in order], [counts[i] for i in order], "samples per object label")
            + f"<p>Over {samples} samples from {len(chosen)} of {len(shards)} feature shards; {len(names)} labels in the "
              f"vocabulary, {unseen} not seen in the sample.</p>")


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(records of metrics.jsonl, lines that were not a JSON object with an int step: torn or foreign)."""
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def tensorboard_scalars(run: RunFiles) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of `<run>/tb`, read by TensorBoard's EventAccumulator (its purge of
    events a resumed run superseded included); {} when there are none."""
    if run._scalars is not None:
        return run._scalars
    run._scalars = {}
    tb = run.run_dir / "tb" if run.run_dir else None
    if tb is None or not tb.is_dir():
        return run._scalars
    from tensorboard.backend.event_processing import event_accumulator

    guidance = {event_accumulator.SCALARS: TB_SIZE_GUIDANCE, event_accumulator.TENSORS: 1, event_accumulator.IMAGES: 1,
                event_accumulator.HISTOGRAMS: 1, event_accumulator.AUDIO: 1, event_accumulator.COMPRESSED_HISTOGRAMS: 1}
    accumulator = event_accumulator.EventAccumulator(str(tb), size_guidance=guidance)
    accumulator.Reload()
    for tag in accumulator.Tags().get("scalars", []):
        run._scalars[tag] = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return run._scalars


def section_training(run: RunFiles) -> str:
    if run.run_dir is None:
        raise Missing("no training run folder found (train.output_dir of the root's config)")
    metrics_path = run.run_dir / "metrics.jsonl"
    scalars = tensorboard_scalars(run)
    records, bad = read_metrics(metrics_path) if metrics_path.is_file() else ([], 0)
    if not records and not scalars:
        raise Missing(f"neither {metrics_path} nor TensorBoard events in {run.run_dir / 'tb'}")
    # Each launch logs data/left_out_per_epoch at the step it starts from: a start after step 0 is a resume.
    resumes = sorted({step for step, _ in scalars.get("data/left_out_per_epoch", []) if step > 0})
    parts = []
    if records:
        skip = {"step", "lr", "grad_norm", "nan_skipped", "overflow_skipped", "samples_seen", "epoch"}
        terms = [k for k in records[0] if k not in skip and isinstance(records[0][k], (int, float))]
        parts.append(svg.line_chart({t: [(r["step"], r.get(t)) for r in records] for t in terms if t != "loss"}
                                    | {"loss (weighted sum)": [(r["step"], r.get("loss")) for r in records]},
                                    "loss terms per step (metrics.jsonl)", resumes))
        parts.append(svg.line_chart({"lr": [(r["step"], r.get("lr")) for r in records]}, "learning rate", resumes))
        parts.append(svg.line_chart({"grad norm": [(r["step"], r.get("grad_norm")) for r in records]}, "gradient norm", resumes))
    else:
        losses = {tag[5:]: pts for tag, pts in scalars.items() if tag.startswith("loss/")}
        parts.append(svg.line_chart(losses, "loss terms (TensorBoard)", resumes))
        for tag, title in (("opt/lr", "learning rate"), ("opt/grad_norm", "gradient norm")):
            if tag in scalars:
                parts.append(svg.line_chart({title: scalars[tag]}, title, resumes))
    if bad:
        parts.append(f"<p class=\"warning\">{bad} unreadable lines of {metrics_path} skipped (a torn last line of a "
                     "killed run, or not a metrics record).</p>")
    if "throughput/samples_per_s" in scalars:
        parts.append(svg.line_chart({"samples/s": scalars["throughput/samples_per_s"]}, "samples per second", resumes))
    else:
        parts.append(f"<p class=\"missing\">samples/s: missing (no TensorBoard events in {run.run_dir / 'tb'}).</p>")
    load = {tag.rsplit("/", 1)[1]: pts for tag, pts in sorted(scalars.items()) if tag.startswith("moe/expert_load/")}
    if load:
        parts.append(svg.line_chart({f"expert {e}": pts for e, pts in load.items()}, "expert load (fraction of samples)", resumes))
    else:
        parts.append(f"<p class=\"missing\">expert load: missing (no moe/expert_load TensorBoard scalars in {run.run_dir / 'tb'}).</p>")
    parts.append(f"<p>Resumes: {', '.join(f'step {s}' for s in resumes) or 'none seen'}.</p>")
    return "".join(parts)


def _evaluation(run: RunFiles) -> dict:
    if run.run_dir is None:
        raise Missing("no training run folder found")
    return _read_json(run.run_dir / "eval.json", "held-out evaluation (eval.json: train.eval_at_end, or the run did not finish)")


def heldout_html(result: dict, images: dict[str, str]) -> str:
    """The held-out grid (image, greedy and beam captions, references) and the scores table."""
    examples = result.get("examples") or [{"key": c["id"], "references": c["references"], "synthetic": c.get("synthetic", []),
                                           "generated": c["greedy"], **({"beam": c["beam"]} if "beam" in c else {})}
                                          for c in result.get("captions", [])[:HELDOUT_EXAMPLES]]
    if not examples:
        raise Missing("the evaluation holds no caption examples")
    cells = []
    for ex in examples[:HELDOUT_EXAMPLES]:
        beam = f'<div class="beam">beam: {_text(ex["beam"])}</div>' if ex.get("beam") else ""
        refs = "".join(f'<div class="ref">ref: {_text(r)}</div>' for r in ex["references"][:3])
        cells.append(f'<figure>{_image(images.get(ex["key"]), ex["key"])}<figcaption><div class="greedy">greedy: '
                     f'{_text(ex["generated"])}</div>{beam}{refs}</figcaption></figure>')
    captioning = result.get("captioning") or {}
    if captioning:
        columns = [c for c in CAPTION_COLUMNS if any(c in s for s in captioning.values())]
        table = _table(["system", *columns], [[html.escape(name), *(f"{100 * s[c]:.2f}" if c in s else "-" for c in columns)]
                                              for name, s in captioning.items()])
        table = f"<p>Scores x100 against {result.get('reference_samples', result.get('samples'))} held-out images:</p>" + table
    else:
        table = f"<p class=\"missing\">No caption scores: {_text(result.get('caption_metrics_skipped', 'none in the evaluation'))}</p>"
    loss = result.get("caption_loss")
    baseline = result.get("lm_without_image_loss")
    if loss is not None:
        table += f"<p>Caption loss {loss:.3f}" + (f" vs the LM without the image {baseline:.3f}" if baseline is not None else "") + "</p>"
    return f'<div class="side"><div class="grid">{"".join(cells)}</div><div>{table}</div></div>'


def retrieval_html(result: dict, images: dict[str, str]) -> str:
    recall = result.get("retrieval")
    if not recall:
        raise Missing("the evaluation has no retrieval scores")
    rows = [[label, *(f"{100 * recall[f'{d}_R@{k}']:.1f}" for k in (1, 5, 10))]
            for d, label in (("image_to_text", "image → text"), ("text_to_image", "text → image"))]
    parts = [_table(["", "R@1", "R@5", "R@10"], rows), f"<p>{_text(result.get('retrieval_protocol', ''), 400)}</p>"]
    examples = result.get("retrieval_examples")
    if not examples:
        parts.append("<p class=\"missing\">Top-5 examples: missing (this evaluation predates them; "
                     "rerun it or `launcher.evaluate --report`).</p>")
    else:
        for ex in examples:
            items = "".join(f'<li class="{"true" if hit["true"] else "other"}">{"✔ " if hit["true"] else ""}{_text(hit["caption"])}'
                            f' <span class="score">{hit["score"]:.3f}</span></li>' for hit in ex["top"])
            parts.append(f'<div class="retrieved">{_image(images.get(ex["key"]), ex["key"])}<ol>{items}</ol></div>')
    return "".join(parts)


def evaluation_image_keys(result: dict) -> list[str]:
    """The keys whose images the held-out grid and the retrieval examples show: the examples of
    training's eval.json, or the first captions of `launcher.evaluate`'s result (which has no examples)."""
    keys = [ex["key"] for ex in result.get("examples") or []][:HELDOUT_EXAMPLES]
    keys = keys or [c["id"] for c in result.get("captions") or []][:HELDOUT_EXAMPLES]
    return keys + [ex["key"] for ex in result.get("retrieval_examples") or [] if ex["key"] not in keys]


def _evaluation_images(run: RunFiles, result: dict) -> dict[str, str]:
    return thumbnails_for_keys(run.raw, evaluation_image_keys(result)) if run.raw else {}


def section_heldout(run: RunFiles) -> str:
    result = _evaluation(run)
    return heldout_html(result, _evaluation_images(run, result))


def section_retrieval(run: RunFiles) -> str:
    result = _evaluation(run)
    return retrieval_html(result, _evaluation_images(run, result))


def section_bank(run: RunFiles) -> str:
    align = getattr(run.config, "align", None)
    if align is not None and not (align.itc_weight > 0 or align.supcon_weight > 0):
        raise Missing("alignment is off (align.itc_weight and align.supcon_weight are 0): no bank")
    scalars = tensorboard_scalars(run)
    bank = {tag: pts for tag, pts in scalars.items() if tag.startswith(("align/", "geodesic/"))}
    if not bank:
        raise Missing(f"no align/* or geodesic/* TensorBoard scalars in {run.run_dir / 'tb' if run.run_dir else 'the run'}")
    refreshes = sorted({int(v) for _, v in bank.get("geodesic/snapshot_step", []) if v >= 0})
    parts = [svg.line_chart({"bank fill": bank["align/bank_fill"]}, "bank entries", refreshes, "refresh")] if "align/bank_fill" in bank else []
    if "geodesic/known_fraction" in bank:
        parts.append(svg.line_chart({"turnover": [(s, 1 - v) for s, v in bank["geodesic/known_fraction"]]},
                                    "turnover: fraction of graph nodes the bank has replaced", refreshes, "refresh"))
    for tag, title in (("geodesic/connected_components", "graph components"), ("geodesic/mean_degree", "mean degree"),
                       ("geodesic/largest_component_fraction", "largest component fraction"), ("geodesic/nodes", "graph nodes"),
                       ("geodesic/intrinsic_dimension", "intrinsic dimension of the bank (TwoNN)"),
                       ("geodesic/short_range_stretch", "short-range stretch: graph path / chord (flagged above 1.25)"),
                       ("geodesic/rank_agreement", "rank agreement of graph and cosine at short range")):
        if tag in bank:
            parts.append(svg.line_chart({title: bank[tag]}, title, refreshes, "refresh"))
    trust = _geodesic_trust(run)
    if trust:
        parts.insert(0, f"<p>{_text(trust)}</p>")
    if not any(tag.startswith("geodesic/") for tag in bank):
        parts.append("<p>No geodesic graph in this run (cosine negatives and metric).</p>")
    return "".join(parts)


def _geodesic_trust(run: RunFiles) -> str | None:
    """The end of training's count of graph refreshes the trust check flagged (eval.json's `geodesics`), as a sentence."""
    path = run.run_dir / "eval.json" if run.run_dir else None
    try:
        trust = json.loads(path.read_text()).get("geodesics") if path and path.is_file() else None
    except (OSError, ValueError):
        return None
    if not trust:
        return None
    flagged = trust["untrusted_refreshes"]
    verdict = (f"{flagged} of {trust['refreshes']} graph refreshes could not follow the bank: geodesic negatives there were no "
               "better than cosine ones" if flagged else f"all {trust['refreshes']} graph refreshes followed the bank")
    last = ", ".join(f"{label} {trust[key]:.2f}" for key, label in (("last_short_range_stretch", "short-range stretch"),
                                                                     ("last_intrinsic_dimension", "intrinsic dimension"))
                     if key in trust)
    return f"Geodesic trust (this launch): {verdict}" + (f" (last refresh: {last})." if last else ".")


def section_ablation(run: RunFiles) -> str:
    base = run.root or (run.run_dir.parent if run.run_dir else None)
    found = sorted(base.glob("ablation.json")) + sorted(base.glob("*/ablation.json")) if base else []
    if not found:
        raise Missing(f"no ablation.json under {base} (python -m launcher.ablate)")
    data = _read_json(found[0], "ablation")
    rows = data.get("rows", [])
    metrics = [m for m in ("BLEU-4", "CIDEr", "ROUGE-L", "image_to_text_R@1", "text_to_image_R@1", "samples_per_s")
               if rows and m in rows[0].get("mean", {})]
    table = [[f"{_text(r['variant'])} ({_text(r.get('description', ''))})", ",".join(map(str, r.get("seeds", []))),
              *(f"{r['mean'][m]:.3f} ± {r['sd'][m]:.3f}" for m in metrics)] for r in rows]
    return f"<p>{found[0]}</p>" + _table(["variant", "seeds", *metrics], table)


BUILDERS = {"ingestion": section_ingestion, "filter": section_filter, "labels": section_labels, "training": section_training,
            "heldout": section_heldout, "retrieval": section_retrieval, "bank": section_bank, "ablation": section_ablation}

STYLE = """body{font-family:sans-serif;margin:20px;max-width:1200px;color:#222}section{border-top:1px solid #ccc;padding:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{width:150px;margin:0;font-size:11px}figure img{display:block}
.score{color:#555}.synthetic{color:#9467bd}.greedy{font-weight:bold}.ref{color:#555}.beam{color:#1f77b4}
.missing{color:#a00}.warning{color:#a60}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
.side{display:flex;gap:16px;flex-wrap:wrap}.retrieved{display:flex;gap:8px;align-items:flex-start;font-size:12px}
li.true{font-weight:bold;color:#2ca02c}.noimage{width:96px;height:96px;background:#eee;font-size:10px}"""


def render_page(title: str, sections: list[tuple[str, str, str | None, str | None]]) -> str:
    """(id, heading, body html or None, why missing or None) per section -> the page."""
    missing = [(heading, why) for _, heading, body, why in sections if body is None]
    summary = ("<p class=\"missing\">Sections missing: " + "; ".join(f"{html.escape(h)}: {_text(w, 400)}" for h, w in missing)
               + "</p>") if missing else "<p>Every section present.</p>"
    body = "".join(f'<section id="{sid}" class="{"present" if content is not None else "missing"}"><h2>{html.escape(heading)}</h2>'
                   + (content if content is not None else f'<p class="missing">Missing: {_text(why, 400)}</p>') + "</section>"
                   for sid, heading, content, why in sections)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{GENERATOR_META}<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{summary}{body}</body></html>")


def build_section(sid: str, heading: str, make) -> tuple[str, str, str | None, str | None]:
    """(id, heading, body, None), or (id, heading, None, why) when `make()` finds nothing to show or fails."""
    try:
        return sid, heading, make(), None
    except Missing as why:
        return sid, heading, None, str(why)
    except Exception as err:  # a damaged file costs its section, never the page
        return sid, heading, None, f"could not be read: {type(err).__name__}: {err}"


def build_sections(run: RunFiles, names=None) -> list[tuple[str, str, str | None, str | None]]:
    return [build_section(sid, heading, lambda sid=sid: BUILDERS[sid](run))
            for sid, heading in SECTIONS if names is None or sid in names]


def build_report(path: Path) -> str:
    run = locate(Path(path))
    return render_page(f"vlpdist run report: {path}", build_sections(run))


def build_evaluation_report(result: dict, images: dict[str, str], title: str) -> str:
    """The held-out and retrieval sections of one evaluation's result (the keys of `launcher.evaluate`'s
    JSON or of training's eval.json), `images` the thumbnails of `evaluation_image_keys(result)`."""
    headings = dict(SECTIONS)
    return render_page(title, [build_section("heldout", headings["heldout"], lambda: heldout_html(result, images)),
                               build_section("retrieval", headings["retrieval"], lambda: retrieval_html(result, images))])


def is_own_report(path: Path) -> bool:
    """Whether the file at `path` is a page `render_page` wrote (its generator marker in the first bytes)."""
    try:
        with open(path, "rb") as handle:
            return GENERATOR_META.encode() in handle.read(MARKER_WINDOW_BYTES)
    except OSError:
        return False


def refuse_foreign_report(path: Path, option: str) -> None:
    """A one-line `UserError` unless `path` is free or holds a report page written earlier (replaced then)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_file() and not path.is_symlink() and is_own_report(path):
        return
    what = "a folder" if path.is_dir() else "a link" if path.is_symlink() else "a file"
    raise UserError(f"{option} {path} is {what} that is not a report vlpdist wrote (no generator mark {GENERATOR!r}): "
                    "choose a new file name (it is never overwritten)")


def write_report(html_text: str, out: Path, option: str = "--out") -> Path:
    """Write the page atomically at `out`, refused (`refuse_foreign_report`) when `out` holds anything else."""
    from vlpdist.atomic import atomic_write_text

    refuse_foreign_report(Path(out), option)
    return atomic_write_text(Path(out), html_text)
