"""Typed configuration: dataclasses are the single source of truth.

Resolution order: dataclass defaults -> YAML file -> `key.sub=value` overrides from the command
line (typed by the field they set, not parsed as YAML: `parse_override`). The resolved config is
written next to the outputs (`save_config`). Any unknown key, wrong type or missing file is a
`UserError` naming the key and the file (one line, exit code 2).

Sections grow with the pipeline: `demo` (synthetic source), `download` (img2dataset); later
stages add their own dataclass here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from vlpdist.errors import UserError


@dataclass
class DemoDataConfig:
    """The embedded synthetic world: coloured shapes with captions, served over loopback HTTP."""

    num_samples: int = 600
    """Good image-caption pairs generated (broken URLs come on top)."""
    seed: int = 0
    """Everything (shapes, colours, captions, which captions are mismatched) follows this seed."""
    image_size: int = 64
    """Side of the square generated images, in pixels."""
    mismatch_fraction: float = 0.2
    """Fraction of samples whose caption deliberately describes another image (web noise)."""
    broken_per_kind: int = 2
    """URLs of each broken kind (404, 500, html, truncated, empty, slow) added to the list."""
    slow_response_s: float = 4.0
    """How long the 'slow' URLs stall; must exceed download.timeout_s to count as a timeout."""
    lm_steps: int = 200
    """Pretraining steps of the demo's tiny GPT-2 (launcher.make_demo_lm) on the training captions and questions."""


@dataclass
class DownloadConfig:
    """img2dataset download of a URL list into webdataset shards under `<root>/raw`."""

    url_list: str = ""
    """A file or a folder of files (parquet, csv, tsv, jsonl). The demo fills this in."""
    input_format: str = "auto"
    """One of auto, parquet, csv, tsv, jsonl; auto picks by file extension."""
    url_col: str = "url"
    """Column holding the image URL (LAION: URL, CC3M: url, SBU: image_url)."""
    caption_col: str = "caption"
    """Column holding the caption (LAION: TEXT, CC3M: caption, SBU: caption)."""
    extra_columns: list[str] = field(default_factory=list)
    """Further columns copied into each sample's json (LAION: similarity, punsafe, ...)."""
    image_size: int = 256
    """Side of the stored images, in pixels (img2dataset resizes on download)."""
    resize_mode: str = "border"
    """img2dataset resize mode: no, keep_ratio, center_crop, border."""
    encode_format: str = "jpg"
    """Image format inside the shards (jpg, png, webp)."""
    encode_quality: int = 95
    """JPEG/WebP quality of the stored images."""
    samples_per_shard: int = 10000
    """URL-list rows per shard; also the unit of resume (a shard is rebuilt whole)."""
    processes: int = 2
    """Download processes on this machine (multiprocessing distributor)."""
    threads: int = 16
    """Download threads per process."""
    timeout_s: float = 10.0
    """Seconds before a slow response counts as a timeout failure."""
    retries: int = 0
    """img2dataset's immediate retries per URL; `--retry-failed` retries later, across runs."""
    distributor: str = "multiprocessing"
    """multiprocessing (one machine) or ray (a Ray cluster; run inside `ray submit`/`ray job`)."""
    user_agent_token: str = "vlpdist"
    """Added to the User-Agent so site owners can identify (and opt out of) the crawler."""
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    """Opt-out X-Robots-Tag directives honoured, as img2dataset does by default."""


@dataclass
class ProcessConfig:
    """Ray processing stage: raw shards -> CLIP features, CapFilt decisions, object labels (`<root>/features`)."""

    enabled: bool = True
    """Whether `python -m data_ingest.run --stage all` runs this stage after the download."""
    ray_address: str = ""
    """"" starts Ray in-process (`ray.init(num_cpus=...)`); "auto" or `host:port` joins a cluster."""
    num_cpus: int = 2
    """CPUs given to an in-process Ray (ignored when joining a cluster)."""
    device: str = "auto"
    """Where models run inside a task: auto (cuda when the task got a GPU), cpu or cuda."""
    cpus_per_task: float = 1.0
    """CPUs each shard task asks Ray for."""
    gpus_per_task: float = 0.0
    """GPUs each shard task asks Ray for; fractional (0.25) packs several tasks on one GPU."""
    loader_workers: int = -1
    """DataLoader worker processes decoding and preprocessing images inside each task; -1 means
    floor(cpus_per_task) - 1 (one CPU drives the models, the rest feed them)."""
    max_retries: int = 3
    """Ray retries of a shard task whose worker died; other shards go on meanwhile."""
    task_timeout_s: float = 7200.0
    """A shard attempt running longer than this is stopped (its actor killed) and counts as a
    failed attempt: the shard is retried (max_retries), so a read stuck for ever holds no actor."""
    schedule_timeout_s: float = 300.0
    """How long the driver waits while no shard actor can start before it says which resource is
    missing; when the cluster has none of it at all, the waiting shards then fail with that line."""
    batch_size: int = 64
    """Images per batched forward pass (CLIP, captioner, ITM)."""
    max_image_pixels: int = 40_000_000
    """Largest image (width x height) decoded; a larger one is a failed row (too_many_pixels). A chunk
    holds batch_size decoded images: 64 at this bound are 7.7 GB of RGB."""
    clip_model: str = "ViT-B-32"
    """open_clip model name (a built-in or one registered from clip_config_dir / beside the checkpoint)."""
    clip_pretrained: str = "laion2b_s34b_b79k"
    """open_clip pretrained tag, or a local checkpoint file loaded through the same call."""
    filter: str = "clip"
    """CapFilt filter: clip (CLIP cosine >= clip_threshold), itm (BLIP ITM prob >= itm_threshold), none."""
    clip_threshold: float = 0.25
    """A caption passes the CLIP filter when cos(image, caption) is at least this."""
    itm_model: str = "Salesforce/blip-itm-base-coco"
    """BLIP image-text matching model (HF name or local folder) for filter=itm."""
    itm_threshold: float = 0.5
    """A caption passes the ITM filter when P(match) is at least this."""
    captioner: str = ""
    """BLIP captioning model (HF name or local folder, e.g. Salesforce/blip-image-captioning-base); "" = off."""
    num_synthetic_captions: int = 3
    """Synthetic captions sampled per image by the captioner (nucleus sampling)."""
    top_p: float = 0.9
    """Nucleus sampling mass for the captioner."""
    max_caption_tokens: int = 30
    """Longest synthetic caption, in tokens."""
    caption_policy: str = "web_and_synthetic"
    """Which passing captions are kept: web, synthetic, web_and_synthetic, web_else_synthetic."""
    paraphraser: str = ""
    """Paraphrases of every kept caption and question, written beside them (issue 18 item 6): "" = off,
    "synthetic" (the demo world's own phrasings, parsed from the text), or a Hugging Face seq2seq
    paraphrase model by name or local folder (e.g. tuner007/pegasus_paraphrase)."""
    num_paraphrases: int = 3
    """k: paraphrases written per kept caption and per question (fewer when the backend finds fewer distinct ones)."""
    paraphrase_beams: int = 10
    """Beam width of a seq2seq paraphraser (>= num_paraphrases): its first k distinct beams are kept."""
    paraphrase_max_tokens: int = 60
    """Longest text a seq2seq paraphraser reads and longest paraphrase it writes, in tokens."""
    vocab: str = "coco80"
    """Object vocabulary: a shipped name (coco80, demo_shapes) or a file, one category per line."""
    demo_truth: str = ""
    """Parquet with url_path and is_mismatched: the summary then reports filter precision/recall."""
    train_demo_clip: bool = False
    """Before processing, train the small demo CLIP into clip_pretrained if that file is missing."""
    demo_clip_epochs: int = 24
    """Epochs of demo CLIP training over the raw shards."""
    demo_clip_lr: float = 3e-3
    """AdamW learning rate of demo CLIP training."""
    demo_clip_batch_size: int = 64
    """Pairs per contrastive batch in demo CLIP training."""
    demo_clip_clean_fraction: float = 0.25
    """Halfway through demo CLIP training, this fraction of lowest-scoring pairs is dropped (bootstrapping)."""


@dataclass
class ModelConfig:
    """The mapper (MoE / ClipCap MLP / ClipCap transformer) and the prefix language model."""

    mapper: str = "moe"
    """Which mapper turns the CLIP embedding into prefix tokens: moe, mlp (ClipCap), transformer (ClipCap)."""
    prefix_length: int = 10
    """P: number of prefix tokens (of the LM's width) the mapper produces."""
    mapper_depth: int = 2
    """MoE: routed blocks after the input projection. transformer: encoder layers. Unused by mlp."""
    num_experts: int = 8
    """E: experts per MoE block; must be divisible by the expert-parallel size."""
    top_k: int = 1
    """Experts each sample is routed to (1..E); gates are renormalised over the chosen k when k >= 2."""
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 5])
    """Odd kernel sizes of the token-mixing (depthwise, over the prefix axis) branches of every expert."""
    capacity_factor: float = 1.25
    """Train-time expert capacity, as a multiple of the even share of samples (DeepSpeed capacity_factor)."""
    eval_drop_tokens: bool = False
    """Drop samples beyond capacity at eval too (using eval_capacity_factor); False keeps eval exact."""
    eval_capacity_factor: float = 2.0
    """Eval-time capacity factor; only used when eval_drop_tokens is true."""
    min_capacity: int = 0
    """Minimum samples per expert regardless of capacity; DeepSpeed asserts batch size >= this."""
    moe_aux_weight: float = 0.01
    """Weight of DeepSpeed's load-balancing loss (l_aux, summed over blocks) in the total loss."""
    transformer_heads: int = 8
    """Attention heads of the ClipCap transformer mapper (must divide the LM width)."""
    lm_name: str = "gpt2"
    """Hugging Face causal LM: a hub name or a local folder saved with save_pretrained."""
    tokenizer_name: str = ""
    """Tokenizer name or local folder; empty means the same as lm_name."""
    freeze_lm: bool = True
    """Keep the LM frozen and train only the mapper (ClipCap's prefix-only training)."""
    max_caption_tokens: int = 32
    """Caption tokens kept per sample, the appended EOS included."""
    bottleneck_tokens: int = 0
    """B learnable tokens placed between the prefix and the caption (0 = none)."""
    bottleneck_only: bool = True
    """With bottleneck tokens: the caption reaches the prefix only through them (a 4-D attention
    mask; LMs that ignore such masks are refused). False: the tokens are extra context only."""
    question_template: str = "Question: {question} Answer:"
    """Prompt a question sample reads after the prefix (and bottleneck tokens); `{question}` is filled
    in. Saved with the run's config, so the export answers with the template it was trained with."""
    max_answer_tokens: int = 8
    """Answer tokens kept per question sample, the appended EOS included (the prompt is cut to
    max_caption_tokens)."""


PARAPHRASE_TARGETS = ("captions", "questions", "both")
"""train.paraphrase_targets: which texts a paraphrase may replace in training."""


@dataclass
class TrainConfig:
    """DeepSpeed training of the mapper: ZeRO, expert parallelism, schedule, checkpoints, logging."""

    output_dir: str = "runs/demo/train"
    """Run folder: config.yaml, deepspeed_config.json, checkpoints/, tb/, export/, eval.json."""
    features_dir: str = ""
    """Feature shards (`NNNNN.tar`); empty means `<root>/features`."""
    heldout_shards: int = 1
    """The last N shards (by name) are held out of training for evaluation."""
    micro_batch_size: int = 32
    """Samples per rank per forward/backward."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (global batch = micro x accumulation x data-parallel ranks)."""
    max_steps: int = 200
    """Optimizer steps of the whole run (the cosine schedule ends here)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached after the warmup."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr x this ratio at max_steps."""
    warmup_steps: int = 20
    """Linear warmup from lr / warmup_steps (the first step learns) to lr over this many optimizer steps (>= 1)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 or 2 (DeepSpeed MoE does not support stage 3)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    compile: bool = False
    """torch.compile the LM and the mapper for the training step (held-out scoring and generation
    stay eager). The first steps pay the compile (about a minute for GPT-2 small on 2 CPU cores);
    after it, GPT-2 small's step was 1.16x faster on 2 CPU cores (launcher.bench)."""
    ep_size: int = 1
    """Expert-parallel degree: ranks that share one copy of all experts; must divide the world size."""
    num_workers: int = 1
    """Data loader worker processes per rank (0 reads in the training process)."""
    seed: int = 0
    """Seeds parameter init, shard order, in-shard shuffling and caption choice."""
    checkpoint_every: int = 100
    """Save a checkpoint every N optimizer steps (and always at the end)."""
    keep_checkpoints: int = 3
    """How many of the most recent checkpoints to keep."""
    resume: bool = True
    """Resume from the latest valid checkpoint in output_dir/checkpoints when there is one."""
    overwrite: bool = False
    """With resume false: remove the checkpoint tags (and `latest`) already in output_dir/checkpoints
    before training, so the new run's saves do not mix with them. False refuses to start a new run
    over checkpoints (exit 2). Nothing else in output_dir is removed."""
    replan_on_resume: bool = False
    """When the data plan (shards, held-out shards, workers, micro-batch, seed) differs from the
    checkpoint's: false refuses to resume, naming what changed; true starts the new plan at the
    next epoch boundary (the rest of the interrupted epoch is not read). The world size cannot change."""
    log_every: int = 10
    """Write scalars to TensorBoard and the terminal every N optimizer steps."""
    caption_log_every: int = 100
    """Write greedy sample captions to TensorBoard every N optimizer steps (0 disables)."""
    dist_timeout_s: float = 300.0
    """torch.distributed timeout: a collective waiting this long on a dead rank fails the job."""
    rendezvous_timeout_s: float = 900.0
    """How long ranks wait at start for every rank to join (uneven starts on a busy cluster are not a dead rank)."""
    max_consecutive_nan_steps: int = 5
    """Optimizer steps with a non-finite loss are skipped (by DeepSpeed, on every rank) and counted; this many in a row abort the run."""
    eval_at_end: bool = True
    """Evaluate on the held-out shards after training and write eval.json."""
    eval_meteor: bool = True
    """Score METEOR at the end of training when Java is there (false: skip it). Its scorer loads
    paraphrase tables for about 10 s per evaluation; the tiny test recipe skips it."""
    eval_max_samples: int = 512
    """At most this many held-out samples are evaluated."""
    eval_max_new_tokens: int = 20
    """Greedy caption length limit at evaluation and for logged sample captions."""
    export_at_end: bool = True
    """Write the consolidated fp32 model (all experts, global ids) to output_dir/export."""
    question_fraction: float = 0.5
    """Share of the samples that hold both a caption and a question which train as the question
    (the rest as the caption). A question-only sample always trains as its question, a caption-only
    one as its caption; 0 trains no question that has a caption beside it."""
    answer_target: str = "sample"
    """The answer a question is taught each time it is read: sample (drawn by the human answers'
    frequency) or most_common (the most frequent, ties by first occurrence)."""
    paraphrase_prob: float = 0.0
    """Probability that a caption (or question) is trained as one of its paraphrases (written by
    process.paraphraser) instead of itself; a sample without paraphrases trains its original.
    The alignment text and held-out evaluation always use the originals."""
    paraphrase_targets: str = "both"
    """Which texts paraphrase_prob may swap: captions, questions or both (the ablation's
    "+ paraphrase (captions)" and "+ paraphrase (questions)" rows train one kind each)."""


@dataclass
class AlignConfig:
    """Alignment of the mapped visual prefix with the LM's text space: ITC and SupCon over a memory
    bank kept by a momentum copy of the mapper, with optional geodesic (k-NN graph) negatives."""

    itc_weight: float = 0.0
    """Weight of the ITC (image-text InfoNCE) term in the loss; 0 turns ITC off."""
    supcon_weight: float = 0.0
    """Weight of the supervised contrastive term over object labels; 0 turns SupCon off."""
    cap_weight: float = 1.0
    """Weight of the captioning cross-entropy (the MoE balance weight is model.moe_aux_weight)."""
    embed_dim: int = 256
    """Width of the shared space the visual and text projection heads map into."""
    text_target: str = "lm"
    """ITC's text side: lm (mean-pooled LM hidden states of the caption alone, every step), lm_cached
    (the same, computed once per caption with a frozen LM and kept on the device), clip (the CLIP
    text embedding stored in the feature shards)."""
    text_cache_entries: int = 1048576
    """With text_target lm_cached: captions whose LM features are kept on the device (beyond: computed each time)."""
    temperature_init: float = 0.07
    """Initial ITC temperature (learnable)."""
    temperature_min: float = 0.01
    """Lower bound of the learnable ITC temperature."""
    temperature_max: float = 0.5
    """Upper bound of the learnable ITC temperature."""
    learn_temperature: bool = True
    """Learn the ITC temperature (within its bounds); false keeps temperature_init."""
    supcon_temperature: float = 0.1
    """SupCon temperature (fixed, as Khosla et al.)."""
    supcon_positives: str = "any_shared"
    """SupCon positives: any_shared (share >= 1 object label, weight 1) or jaccard (weighted by label Jaccard)."""
    bank_size: int = 65536
    """Memory bank entries (MoCo/ALBEF size); a multiple of world size x micro-batch."""
    bank_unique_ids: bool = True
    """Never hold two entries of one sample id (an older copy is invalidated on enqueue)."""
    momentum: float = 0.995
    """EMA momentum of the mapper copy that fills the bank; 0 = the online model's detached outputs."""
    distill_alpha: float = 0.0
    """ALBEF momentum distillation: ITC targets mix this much of the momentum model's soft targets."""
    metric: str = "cosine"
    """SupCon's logit metric for bank keys: cosine, or geodesic (1 - d^2 / 2 of the graph shortest-path
    distance d between visual embeddings, in chords: equal to the cosine on one hop, so graph-known and
    other keys share one scale; keys the graph does not describe stay cosine; ITC stays image-text cosine)."""
    negatives: str = "all"
    """all, or geodesic_hard: of each anchor's hard_negative_pool cosine-nearest bank entries keep the
    hard_negatives whose manifold path is longest relative to their cosine distance."""
    false_negatives: str = "none"
    """none, or geodesic: bank entries within false_negative_radius of the anchor along the manifold are not negatives."""
    hard_negative_pool: int = 256
    """Cosine-nearest bank entries per anchor considered for geodesic hard negatives."""
    hard_negatives: int = 64
    """Bank negatives kept per anchor with negatives=geodesic_hard (in-batch negatives are always kept)."""
    false_negative_radius: float = 0.3
    """Geodesic radius (path length in chords |x - y| between unit embeddings) inside which a bank entry counts as a likely false negative."""
    geodesic_k: int = 10
    """Neighbours per node of the k-NN graph."""
    geodesic_backend: str = "torch"
    """k-NN search: torch (brute force on the training device), faiss_flat, faiss_ivf, faiss_hnsw."""
    geodesic_method: str = "landmarks"
    """landmarks (distances through landmark nodes: device ops only, what pays at 65k entries) or exact
    (host Dijkstra from every anchor each micro-batch: about 90 ms per anchor at 65,536 nodes on a CPU)."""
    geodesic_landmarks: int = 64
    """Landmark nodes with geodesic_method=landmarks."""
    geodesic_limit: float = 1.0
    """Dijkstra stops at this path length in chords (beyond it: unreachable, a finite far distance)."""
    geodesic_refresh_every: int = 50
    """Rebuild the k-NN graph over the bank every N optimizer steps."""
    geodesic_local_nodes: int = 1024
    """With geodesic_method=landmarks and a finite geodesic_limit: each node keeps its exact graph distances
    to at most this many nodes within the limit, so that distances inside the limit are exact (0: the
    landmark bound alone, which launcher.geodesic_stretch measured 1.9-4.4x too long at the median there at
    65,536 nodes; with the balls it is exact: README, Alignment)."""

    @property
    def enabled(self) -> bool:
        return self.itc_weight > 0 or self.supcon_weight > 0

    @property
    def uses_geodesic(self) -> bool:
        return self.metric == "geodesic" or self.negatives == "geodesic_hard" or self.false_negatives == "geodesic"


@dataclass
class Config:
    """The whole vlpdist configuration tree."""

    root: str = "runs/demo"
    """Dataset root: raw/ (img2dataset shards), features/ (processed), source/ (demo URL list)."""
    base_dir: str = ""
    """The folder this config's relative paths were given from; "" means the working directory.
    `save_config` records the working directory, so a saved run config read by `load_run_config`
    (`launcher.export`, `launcher.evaluate`) finds its paths from any working directory."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    align: AlignConfig = field(default_factory=AlignConfig)


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file at `path` (optional) <- `key.sub=value` overrides (see `parse_override`)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # Every override is checked before the file is read: a typo on the command line fails first.
    assignments = [parse_override(item) for item in overrides]
    merged = OmegaConf.structured(Config)
    if path is not None:
        values = _read_yaml(Path(path))
        _check_sections(values, Config, str(path))
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as err:
            raise UserError(_describe_config_error(err, str(path))) from None
    # Merged before the YAML's interpolations resolve, so `root=<dir>` moves every `${root}/...` path.
    for names, value in assignments:
        nested: Any = _literal(value)
        for name in reversed(names):
            nested = {name: nested}
        merged = OmegaConf.merge(merged, nested)
    config = OmegaConf.to_object(merged)
    _check_values(config)
    return config


def _literal(value: Any) -> Any:
    """`value` escaped so that OmegaConf resolves it to itself: a `${` in a string is text, not an
    interpolation (the backslashes before it doubled, as OmegaConf's grammar reads them)."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", value)
    if isinstance(value, list):
        return [_literal(item) for item in value]
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    return value


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`key.sub=value` -> (("key", "sub"), the value in the field's declared type).

    The value is the text after the first `=`, not YAML: a str field takes it exactly as typed
    (spaces, `#`, leading zeros, `@`, an empty string); an int, float or bool field converts it
    (true/false, any case, for a bool); a list field takes `[a, b, ...]`, each element converted
    by the element type (elements cannot hold a comma); an Optional field takes `null` for None;
    an Enum field takes a member's name or value. Anything else is a `UserError` naming the key."""
    key, equals, text = item.partition("=")
    key = key.strip()
    if not equals:
        raise UserError(f"config override {item!r} (command line) is not of the form key.sub=value")
    names = tuple(key.split("."))
    if not all(names):
        raise UserError(f"config override {item!r} (command line) has an empty key or key part before '='")
    section: type = Config
    for depth, name in enumerate(names):
        where = ".".join(names[: depth + 1])
        if not dataclasses.is_dataclass(section):
            raise UserError(f"config key '{'.'.join(names[:depth])}' in command line is a value, not a section: '{key}' does not exist")
        field_types = typing.get_type_hints(section)
        if name not in {f.name for f in dataclasses.fields(section)}:
            raise UserError(f"unknown config key '{where}' in command line")
        section = field_types[name]
    if dataclasses.is_dataclass(section):
        example = dataclasses.fields(section)[0].name
        raise UserError(f"config key '{key}' in command line is a section, not a value: set its keys, e.g. {key}.{example}=...")
    return names, _convert_override_value(text, section, key)


def _convert_override_value(text: str, kind: Any, key: str) -> Any:
    def refuse(what: str) -> UserError:
        return UserError(f"config key '{key}' in command line: {text!r} is not {what}")

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1:
            raise TypeError(f"config key '{key}': a union of {others} has no command-line form")
        if text.strip() == "null" and len(others) < len(args):
            return None
        return _convert_override_value(text, others[0], key)
    if origin is list:
        inner = text.strip()
        if not (inner.startswith("[") and inner.endswith("]")):
            raise refuse("a list (write [a, b, ...])")
        inner = inner[1:-1].strip()
        return [_convert_override_value(part.strip(), args[0], key) for part in inner.split(",")] if inner else []
    if kind is str:
        return text
    if kind is bool:
        if text.strip().lower() not in ("true", "false"):
            raise refuse("true or false")
        return text.strip().lower() == "true"
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise refuse("an integer") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise refuse("a number") from None
        if not math.isfinite(value):
            raise refuse("a finite number")
        return value
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        for member in kind:
            if text in (member.name, str(member.value)):
                return member
        raise refuse(f"one of {[member.name for member in kind]}")
    raise TypeError(f"config key '{key}': field type {kind!r} has no command-line form")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path}{line} is not valid YAML") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(values).__name__}")
    return values


def _check_sections(values: dict, section: type, origin: str, prefix: str = "") -> None:
    """A section given a value (`train: 5`) is refused by name; OmegaConf's own error names no key."""
    field_types = typing.get_type_hints(section)
    for name, value in values.items():
        kind = field_types.get(name) if name in {f.name for f in dataclasses.fields(section)} else None
        if kind is None or not dataclasses.is_dataclass(kind):
            continue  # unknown keys and plain values: OmegaConf's merge names them
        if not isinstance(value, dict):
            raise UserError(f"config key '{prefix}{name}' in {origin} is a section: it takes a mapping of its keys, not {value!r}")
        _check_sections(value, kind, origin, f"{prefix}{name}.")


def _describe_config_error(err: Exception, origin: str) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return f"unknown config key '{key}' in {origin}"
    message = str(getattr(err, "msg", err)).splitlines()[0]
    return f"config key '{key}' in {origin}: {message}"


def _check_values(config: Config) -> None:
    """Value checks the type system cannot express."""
    choices = {
        "download.input_format": (config.download.input_format, {"auto", "parquet", "csv", "tsv", "jsonl"}),
        "download.distributor": (config.download.distributor, {"multiprocessing", "ray"}),
        "download.resize_mode": (config.download.resize_mode, {"no", "keep_ratio", "center_crop", "border"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {sorted(allowed)}")
    if config.demo.lm_steps < 1:
        raise UserError(f"config key 'demo.lm_steps' must be >= 1, not {config.demo.lm_steps}")
    align = config.align
    align_choices = {
        "align.text_target": (align.text_target, {"lm", "lm_cached", "clip"}),
        "align.supcon_positives": (align.supcon_positives, {"any_shared", "jaccard"}),
        "align.metric": (align.metric, {"cosine", "geodesic"}),
        "align.negatives": (align.negatives, {"all", "geodesic_hard"}),
        "align.false_negatives": (align.false_negatives, {"none", "geodesic"}),
        "align.geodesic_backend": (align.geodesic_backend, {"torch", "faiss_flat", "faiss_ivf", "faiss_hnsw"}),
        "align.geodesic_method": (align.geodesic_method, {"exact", "landmarks"}),
    }
    for key, (value, allowed) in align_choices.items():
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {sorted(allowed)}")
    if not 0 < align.temperature_min <= align.temperature_init <= align.temperature_max:
        raise UserError("config keys 'align.temperature_*' must satisfy 0 < temperature_min <= temperature_init <= temperature_max")
    if not 0.0 <= align.momentum < 1.0 or not 0.0 <= align.distill_alpha <= 1.0:
        raise UserError("config keys 'align.momentum' must be in [0, 1) and 'align.distill_alpha' in [0, 1]")
    if align.distill_alpha > 0 and align.momentum == 0:
        raise UserError("config key 'align.distill_alpha' needs a momentum model (align.momentum > 0)")
    for key in ("embed_dim", "geodesic_k", "geodesic_landmarks", "geodesic_refresh_every", "hard_negative_pool", "hard_negatives"):
        if getattr(align, key) < 1:
            raise UserError(f"config key 'align.{key}' must be >= 1")
    if align.geodesic_local_nodes < 0:
        raise UserError("config key 'align.geodesic_local_nodes' must be >= 0")
    if min(align.itc_weight, align.supcon_weight, align.cap_weight) < 0:
        raise UserError("config keys 'align.*_weight' must be >= 0")
    if config.model.bottleneck_tokens < 0:
        raise UserError("config key 'model.bottleneck_tokens' must be >= 0")
    if "{question}" not in config.model.question_template:
        raise UserError("config key 'model.question_template' must contain '{question}'")
    if config.model.max_answer_tokens < 1:
        raise UserError("config key 'model.max_answer_tokens' must be >= 1")
    if not 0.0 <= config.train.question_fraction <= 1.0:
        raise UserError("config key 'train.question_fraction' must be in [0, 1]")
    if not 0.0 <= config.train.paraphrase_prob <= 1.0:
        raise UserError("config key 'train.paraphrase_prob' must be in [0, 1]")
    if config.train.paraphrase_targets not in PARAPHRASE_TARGETS:
        raise UserError(f"config key 'train.paraphrase_targets' is {config.train.paraphrase_targets!r}; "
                        f"expected one of {list(PARAPHRASE_TARGETS)}")
    if config.train.answer_target not in ("sample", "most_common"):
        raise UserError(f"config key 'train.answer_target' is {config.train.answer_target!r}; expected one of ['most_common', 'sample']")
    # numpy's generators (shard order, shuffling) refuse a negative seed: here, not in a loader worker hours in.
    if not 0 <= config.train.seed < 2**32:
        raise UserError(f"config key 'train.seed' is {config.train.seed}; it must be in [0, 2**32)")
    if not 0.0 <= config.demo.mismatch_fraction < 1.0:
        raise UserError("config key 'demo.mismatch_fraction' must be in [0, 1)")


SAVED_CONFIG_HEADER = "# vlpdist: the resolved config of this folder's run (save_config); replaced on every run\n"
"""The first line of every config.yaml `save_config` writes: a config.yaml without it (the user's own,
e.g. `data_ingest.run --config <root>/config.yaml`) is never replaced."""


def save_config(config: Config, folder: str | os.PathLike) -> Path:
    """Write the resolved config as YAML into `folder` (atomically) and return its path. A config.yaml
    already there that this function did not write (no `SAVED_CONFIG_HEADER`) is refused, untouched."""
    from vlpdist.atomic import atomic_write_text

    path = Path(folder) / "config.yaml"
    if path.is_symlink() or path.is_dir() or path.is_file() and not path.read_text(errors="replace").startswith(SAVED_CONFIG_HEADER):
        raise UserError(f"{path} exists and was not written by vlpdist (a run's resolved config starts with "
                        f"{SAVED_CONFIG_HEADER.strip()!r}); keep your own config outside the output folder, or remove it")
    # Every value is resolved: a `${` left in a string is text, and must read back as text.
    resolved = _literal(dataclasses.asdict(config))
    resolved["base_dir"] = resolved["base_dir"] or os.getcwd()  # where the relative paths it holds were valid
    return atomic_write_text(path, SAVED_CONFIG_HEADER + yaml.safe_dump(resolved, sort_keys=False))


# Fields that always name a path, and fields that name either a path or a hub / open_clip / shipped name.
PATH_FIELDS = ("root", "download.url_list", "process.demo_truth", "train.output_dir", "train.features_dir")
PATH_OR_NAME_FIELDS = ("process.clip_pretrained", "process.itm_model", "process.captioner", "process.vocab",
                       "model.lm_name", "model.tokenizer_name")


def resolve_config_paths(config: Config, base_dir: str | os.PathLike, keys: Sequence[str]) -> Config:
    """`config` with the relative paths of `keys` made absolute against `base_dir` (in place; returned).
    A path-or-name field is a path when the path exists there, else it stays a name ("gpt2")."""
    for key in keys:
        section_name, _, name = key.rpartition(".")
        section = getattr(config, section_name) if section_name else config
        value = getattr(section, name)
        if not value or Path(value).is_absolute():
            continue
        candidate = Path(base_dir) / value
        if key in PATH_FIELDS or candidate.exists():
            setattr(section, name, os.path.normpath(candidate))
    return config


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """A config, its relative paths resolved against the folder they were given from (`base_dir`):
    a run's saved config.yaml (`save_config`) then works from any working directory. A config
    without `base_dir` (written by hand) keeps its paths relative to the working directory."""
    config = load_config(path, overrides)
    if not config.base_dir:
        return config
    # A path typed on this command line stays relative to the working directory, as on any command line.
    typed_here = {item.split("=", 1)[0].strip() for item in overrides}
    return resolve_config_paths(config, config.base_dir, [key for key in PATH_FIELDS + PATH_OR_NAME_FIELDS if key not in typed_here])
