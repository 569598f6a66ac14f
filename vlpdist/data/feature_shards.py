"""Feature shards -> micro-batches, dealt by sample over ranks and loader workers, resumable mid-epoch.

Every rank and every loader worker of it is one *slot* (`rank * num_workers + worker`). In each
epoch the training shards are put in a seeded order, which makes one sequence of samples (each
shard's samples in tar order); slot s reads the s-th contiguous span of that sequence, L samples
long, where L = (samples // slots) rounded down to whole micro-batches. So every slot yields the
same number of micro-batches (ranks stay in lockstep), every sample is read at most once per
epoch, and what is left out is the sequence's tail: fewer than slots x micro_batch_size samples
per epoch, i.e. less than one micro-batch per slot, at any shard, rank and worker count (a span
may start and end inside shards, and a shard may feed several slots). The order changes every
epoch, so a different tail is left out each time. Dealing shards whole instead cuts every slot to
the smallest slot's share, which lost 22-36 % of an epoch at real shard and slot counts.

Shard sample counts are counted from the tars' member headers and checked against the processing
stage's `<shard>_stats.json` (`written`) by rank 0, which builds the plan (or the error that stops
every rank alike) and sends it to the other ranks, so ranks cannot disagree about it.
`ShardPlan.describe()` is what a checkpoint records (shard names and counts, held-out shard names,
world size, workers, micro-batch, seed, shuffle buffer), so a resume can tell whether the saved
data position still means the same samples.

Each slot streams its span with webdataset through a seeded shuffle buffer (`wds.shuffle`) and
cuts micro-batches. A rank's DataLoader takes batches from its workers in turn, so the rank's
n-th micro-batch is batch n // W of worker n % W. The data position saved in checkpoints is that
one number n (micro-batches consumed by the rank): on resume, every worker replays its slot's
stream from the start of the epoch without decoding, and worker order is rotated so that the next
batch comes first. Samples are seeded by epoch, so the resumed run sees exactly what the straight
run saw.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import signal
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from vlpdist.data.tars import tar_file_names
from vlpdist.errors import UserError

STATS_SUFFIX = "_stats.json"
"""The processing stage writes `<shard>_stats.json` beside `<shard>.tar`; its `written` is the sample count."""

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
"""captions -> (input_ids (B, T), attention_mask (B, T)), run in the loader workers."""


def list_feature_shards(features_dir: str | Path) -> list[Path]:
    """The `NNNNN.tar` shards of a features folder, sorted by name."""
    folder = Path(features_dir)
    if not folder.is_dir():
        raise UserError(f"feature folder {folder} does not exist (run the processing stage first)")
    shards = sorted(path for path in folder.glob("*.tar") if path.stem.isdigit())
    if not shards:
        raise UserError(f"feature folder {folder} holds no NNNNN.tar shards")
    return shards


def split_heldout(shards: list[Path], heldout_shards: int) -> tuple[list[Path], list[Path]]:
    """(training shards, held-out shards): the last `heldout_shards` are held out (0 holds none out)."""
    if heldout_shards < 0 or heldout_shards >= len(shards):
        raise UserError(
            f"config key 'train.heldout_shards' is {heldout_shards}; the feature folder has {len(shards)} shards "
            "and at least one must be left for training"
        )
    cut = len(shards) - heldout_shards
    return shards[:cut], shards[cut:]


def count_shard_samples(shard: Path) -> int:
    """Samples in a webdataset tar: distinct keys (a member's name up to the first dot of its base
    name, as webdataset groups them), from the member headers alone. A cut or corrupt tar is a `UserError`."""
    with open(shard, "rb") as file:
        names, damage = tar_file_names(file)
    if damage:
        raise UserError(f"feature shard {shard} is cut or corrupt ({damage}); rerun the processing stage for it")
    return len({name[: len(name) - len(name.rpartition("/")[2])] + name.rpartition("/")[2].split(".", 1)[0]
                for name in names})


def count_shard_share(features_dir: str | Path, rank: int, world_size: int) -> tuple[dict[str, int], str | None]:
    """This rank's share of counting a feature folder's tars, every `world_size`-th shard by name
    from the `rank`-th: ({shard name: samples}, None), or ({}, the one-line error). Counting reads
    every member header (about 1 s per 10k-sample shard on a busy machine), so the ranks share it
    and rank 0 is done long before the other ranks' wait for its plan could time out. No collective."""
    try:
        return {shard.name: count_shard_samples(shard) for shard in list_feature_shards(features_dir)[rank::world_size]}, None
    except UserError as err:
        return {}, str(err)
    except Exception as err:  # noqa: BLE001 - any failure here must reach rank 0, not leave the others waiting
        return {}, f"counting the feature shards in {features_dir} failed: {type(err).__name__}: {err}"


def merge_shard_shares(shares: list[tuple[dict[str, int], str | None]]) -> dict[str, int]:
    """Every rank's `count_shard_share` as one {shard name: samples}; the first error a rank met is a `UserError`."""
    counted: dict[str, int] = {}
    for share, error in shares:
        if error is not None:
            raise UserError(error)
        counted.update(share)
    return counted


def _stats_count(stats: Path) -> int:
    try:
        return int(json.loads(stats.read_text())["written"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{stats} is not a processing stats file (no integer 'written'); rerun the processing "
                        "stage for its shard") from None


def shard_sample_counts(shards: list[Path], counted: dict[str, int] | None = None) -> tuple[list[int], int]:
    """(samples per shard, how many shards had no stats file): every tar's samples, from `counted`
    (shard name -> samples, as `merge_shard_shares` gives them) or counted here, checked against its
    `<shard>_stats.json`'s `written`. A disagreement is a `UserError` here, at planning, in either
    direction: a stats file that over-counts would fail the rank that reaches the shard's end hours
    in (while the others wait in a collective), one that under-counts would drop the shard's tail
    every epoch."""
    counted = counted or {}
    counts = [counted[shard.name] if shard.name in counted else count_shard_samples(shard) for shard in shards]
    without_stats = 0
    for shard, count in zip(shards, counts):
        stats = shard.with_name(shard.stem + STATS_SUFFIX)
        if not stats.is_file():
            without_stats += 1
        elif (stats_count := _stats_count(stats)) != count:
            raise UserError(
                f"feature shard {shard} holds {count} samples but {stats.name} counts {stats_count}: the "
                "two are not from the same processing run; rerun the processing stage for the shard"
            )
    return counts, without_stats


def _epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *more])


@dataclass
class ShardPlan:
    """What every slot reads: the training shards and their sample counts, the slot layout, the seed.

    Epochs are numbered from `first_epoch` (a plan made when resuming with a changed data plan
    starts at the epoch after the checkpoint's), and seeded by that absolute number."""

    shards: list[str]
    counts: list[int]
    world_size: int
    num_workers: int
    micro_batch_size: int
    seed: int
    heldout: list[str] = field(default_factory=list)
    shuffle_buffer: int = 1000
    first_epoch: int = 0

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def total_samples(self) -> int:
        return sum(self.counts)

    @property
    def batches_per_slot(self) -> int:
        """Micro-batches every slot yields per epoch (the same in every epoch and every slot)."""
        return self.total_samples // self.num_slots // self.micro_batch_size

    @property
    def batches_per_rank(self) -> int:
        """Micro-batches a rank consumes per epoch (all its workers')."""
        return self.batches_per_slot * self.workers_per_rank

    @property
    def left_out_per_epoch(self) -> int:
        """Samples not read in an epoch: fewer than num_slots x micro_batch_size."""
        return self.total_samples - self.num_slots * self.batches_per_slot * self.micro_batch_size

    def check(self) -> None:
        if self.batches_per_slot < 1:
            raise UserError(
                f"{self.total_samples} training samples cannot make one micro-batch of {self.micro_batch_size} for each "
                f"of {self.world_size} ranks x {self.workers_per_rank} loader workers; lower train.micro_batch_size "
                "or train.num_workers"
            )

    def slot_pieces(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end sample) of the pieces of shards slot `slot` reads in `epoch`, in order."""
        span = self.batches_per_slot * self.micro_batch_size
        begin, end = slot * span, (slot + 1) * span  # of the epoch's sample sequence
        pieces, start = [], 0
        for index in _epoch_rng(self.seed, epoch).permutation(len(self.shards)).tolist():
            stop = start + self.counts[index]
            if stop > begin and start < end:
                pieces.append((index, max(begin, start) - start, min(end, stop) - start))
            if stop >= end:
                break
            start = stop
        return pieces

    def locate(self, slot_batch: int) -> tuple[int, int]:
        """(absolute epoch, batch within the epoch) of a slot's `slot_batch`-th batch counted from the plan's start."""
        return self.first_epoch + slot_batch // self.batches_per_slot, slot_batch % self.batches_per_slot

    def epoch_of_position(self, data_position: int) -> tuple[int, int]:
        """(absolute epoch, micro-batches into it) of a rank's data position."""
        return self.first_epoch + data_position // self.batches_per_rank, data_position % self.batches_per_rank

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records of the plan: shard names (not paths, so a moved folder still
        matches) and counts, held-out names, layout, seed and shuffle buffer; `first_epoch` apart."""
        return {
            "shards": [[Path(path).name, count] for path, count in zip(self.shards, self.counts)],
            "heldout": [Path(path).name for path in self.heldout],
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def fingerprint(self) -> str:
        return plan_fingerprint(self.describe())


def plan_fingerprint(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def plan_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two `ShardPlan.describe()` results, one phrase each (empty when equal)."""
    changes = [
        f"{key} {saved.get(key)} -> {current.get(key)}"
        for key in ("world_size", "num_workers", "micro_batch_size", "seed", "shuffle_buffer")
        if saved.get(key) != current.get(key)
    ]
    before, after = dict(map(tuple, saved.get("shards", []))), dict(map(tuple, current.get("shards", [])))
    if before != after:
        added, removed = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
        recounted = sorted(name for name in after.keys() & before.keys() if after[name] != before[name])
        parts = [f"{len(names)} {what} (e.g. {names[0]})" for names, what in
                 ((added, "added"), (removed, "removed"), (recounted, "with other sample counts")) if names]
        changes.append(f"training shards: {', '.join(parts)}")
    if saved.get("heldout", []) != current.get("heldout", []):
        changes.append(f"held-out shards {saved.get('heldout', [])[:3]} -> {current.get('heldout', [])[:3]}")
    return changes


def build_shard_plan(
    shards: list[Path], world_size: int, num_workers: int, micro_batch_size: int, seed: int,
    heldout: list[Path] = (), counts: list[int] | None = None,
) -> ShardPlan:
    """The plan over `shards` (counts from the processing stats unless given). Run it on one rank and broadcast."""
    if counts is None:
        counts, _ = shard_sample_counts(shards)
    plan = ShardPlan(
        shards=[str(path) for path in shards],
        counts=list(counts),
        world_size=world_size,
        num_workers=num_workers,
        micro_batch_size=micro_batch_size,
        seed=seed,
        heldout=[str(path) for path in heldout],
    )
    plan.check()
    return plan


def _raw_samples(shards: list[str]) -> Iterator[dict[str, Any]]:
    """Undecoded samples (member bytes by extension) of the shards, in order, via webdataset."""
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())
    return iter(pipeline)


def _slot_samples(plan: ShardPlan, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
    """The undecoded samples of slot `slot` in `epoch`, shuffled by a buffer seeded by (seed, epoch, slot)."""
    import webdataset as wds

    def pieces() -> Iterator[dict[str, Any]]:
        for index, first, end in plan.slot_pieces(epoch, slot):
            # Skipping into a shard reads the skipped members' bytes: feature samples are KBs.
            read = 0
            for sample in itertools.islice(_raw_samples([plan.shards[index]]), first, end):
                read += 1
                yield sample
            if read != end - first:
                raise UserError(
                    f"feature shard {plan.shards[index]} holds {first + read} samples, but its stats count "
                    f"{plan.counts[index]}; rerun the processing stage for it"
                )

    seed = int(np.random.SeedSequence([plan.seed, epoch, slot]).generate_state(1)[0])
    shuffle = wds.shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=random.Random(seed))
    return iter(shuffle(pieces()))


def sample_id_of(key: str) -> int:
    """A sample's int64 id for the memory bank: 63 bits of its key's BLAKE2b hash, never negative
    (-1 marks an empty bank slot). Two of n keys collide with probability about n^2 / 2^64: 5e-2 at
    a billion samples, and a collision only costs one pair treated as the same sample."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass(frozen=True)
class QuestionSampling:
    """How the loader turns samples into training rows (train.question_fraction, train.answer_target,
    train.paraphrase_prob): a question-only sample always trains as its question, a sample with a
    caption and a question as the question with probability `fraction`, the answer drawn by
    `answer_target` ("sample" | "most_common"); the caption or question is then swapped for one of
    its paraphrases with probability `paraphrase_prob` when `paraphrase_targets` ("captions" |
    "questions" | "both") names its kind. All drawn from (seed, epoch, key), so a resumed run and
    any rank or worker layout make the same choices."""

    fraction: float = 0.5
    answer_target: str = "sample"
    seed: int = 0
    paraphrase_prob: float = 0.0
    paraphrase_targets: str = "both"


LmInputs = Callable[[list[str], list[str | None], list[str | None]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(captions, questions or None, answers or None) -> (input_ids, attention_mask, target_mask) (B, T)
(`vlpdist.models.captioner.tokenize_lm_inputs`), run in the loader workers."""


def _decode(sample: dict[str, Any], epoch: int) -> dict[str, Any]:
    from vlpdist.data.feature_format import decode_feature_sample
    from vlpdist.data.question_answer import ANSWERS, QUESTION, alignment_text

    feature = decode_feature_sample(sample)
    qa = feature.qa
    # One of the kept captions per sample and epoch, chosen from the key so that it does not
    # depend on the order samples are read in. A question sample without captions aligns with its
    # alignment text (text embedding row 0).
    captions = feature.captions
    choice = zlib.crc32(f"{epoch}:{feature.key}".encode()) % len(captions) if captions else 0
    return {
        "key": feature.key,
        "clip": feature.image_embedding,
        "clip_text": feature.text_embeddings[choice],
        "clip_texts": feature.text_embeddings,
        "caption": captions[choice] if captions else alignment_text(qa[QUESTION], qa[ANSWERS]),
        "caption_paraphrases": feature.caption_paraphrases[choice] if feature.caption_paraphrases else [],
        "question_paraphrases": feature.question_paraphrases,
        "caption_index": choice,
        "captions": captions,
        "labels": feature.labels,
        "decision": feature.decision,
        "qa": qa,
    }


def choose_tasks(samples: list[dict[str, Any]], sampling: QuestionSampling, epoch: int) -> tuple[list[str | None], list[str | None]]:
    """Per sample (question or None, answer or None): which task it trains this epoch (see `QuestionSampling`)."""
    from vlpdist.data.question_answer import ANSWERS, QUESTION, choose_answer_target

    questions: list[str | None] = []
    answers: list[str | None] = []
    for sample in samples:
        qa = sample.get("qa") or {}
        rng = np.random.default_rng([sampling.seed, epoch, zlib.crc32(sample["key"].encode())])
        as_question = bool(qa) and (not sample["captions"] or rng.random() < sampling.fraction)
        questions.append(qa[QUESTION] if as_question else None)
        answers.append(choose_answer_target(qa[ANSWERS], sampling.answer_target, rng) if as_question else None)
    return questions, answers


_PARAPHRASE_STREAM = 1
"""Extra seed word of the paraphrase draws, so they do not shift `choose_tasks`'s draws (same seed, epoch, key)."""


def choose_paraphrases(samples: list[dict[str, Any]], questions: list[str | None], sampling: QuestionSampling,
                       epoch: int) -> tuple[list[str], list[str | None], list[bool]]:
    """(the caption each sample's LM is taught, its question, whether that text is a paraphrase):
    a question row swaps its question, a caption row its caption, for one of its paraphrases with
    probability `sampling.paraphrase_prob` when `sampling.paraphrase_targets` names its kind (a text
    without paraphrases stays itself)."""
    captions, asked, paraphrased = [], [], []
    for sample, question in zip(samples, questions):
        kind = "questions" if question is not None else "captions"
        targeted = sampling.paraphrase_targets in (kind, "both")
        choices = sample.get("question_paraphrases" if question is not None else "caption_paraphrases", []) if targeted else []
        swap, text = False, None
        if choices and sampling.paraphrase_prob > 0:
            rng = np.random.default_rng([sampling.seed, epoch, zlib.crc32(sample["key"].encode()), _PARAPHRASE_STREAM])
            swap = bool(rng.random() < sampling.paraphrase_prob)
            text = choices[int(rng.integers(len(choices)))] if swap else None
        captions.append(text if swap and question is None else sample["caption"])
        asked.append(text if swap and question is not None else question)
        paraphrased.append(swap)
    return captions, asked, paraphrased


def collate_features(samples: list[dict[str, Any]], tokenize: Tokenize | None = None, lm_inputs: LmInputs | None = None,
                     sampling: QuestionSampling | None = None, epoch: int = 0) -> dict[str, Any]:
    """Decoded samples -> a batch: `clip` (B, D) float32, `clip_text` (B, D) the chosen captions' CLIP
    text embeddings, `sample_ids` (B,) int64, `label_ids` (B, L) int64 padded with -1, `caption_index`
    (B,) int64, per-sample lists, and with `tokenize` the chosen captions' `input_ids` /
    `attention_mask` (B, T), so tokenising happens in the loader workers.

    With `lm_inputs` (questions in training): `is_question` (B,) bool, `question` / `answer` lists
    (None for caption rows), and `input_ids` / `attention_mask` / `target_mask` are the LM's input
    (`[prompt | answer]` for question rows), while `text_ids` / `text_mask` (from `tokenize`) are the
    alignment text: the caption, or for a question-only sample its `alignment_text`.

    With `sampling.paraphrase_prob` > 0, the LM's input may be a paraphrase (`choose_paraphrases`):
    `question` is then the paraphrased question, `trained_caption` the caption the LM is taught and
    `paraphrased` (B,) bool marks those rows. `caption` and the alignment text stay the originals:
    their CLIP text embedding and cached LM features (keyed by sample and caption index) are the originals'."""
    longest = max(1, max(len(sample["labels"]) for sample in samples))
    label_ids = torch.full((len(samples), longest), -1, dtype=torch.long)
    for row, sample in enumerate(samples):
        label_ids[row, : len(sample["labels"])] = torch.tensor(sample["labels"], dtype=torch.long)
    batch = {
        "clip": torch.from_numpy(np.stack([sample["clip"] for sample in samples]).astype(np.float32)),
        "clip_text": torch.from_numpy(np.stack([sample["clip_text"] for sample in samples]).astype(np.float32)),
        "sample_ids": torch.tensor([sample_id_of(sample["key"]) for sample in samples], dtype=torch.long),
        "caption_index": torch.tensor([sample["caption_index"] for sample in samples], dtype=torch.long),
        "label_ids": label_ids,
        "caption": [sample["caption"] for sample in samples],
        "captions": [sample["captions"] for sample in samples],
        "keys": [sample["key"] for sample in samples],
        "labels": [sample["labels"] for sample in samples],
        "qa": [sample.get("qa") or {} for sample in samples],
    }
    if lm_inputs is not None:
        sampling = sampling or QuestionSampling()
        questions, answers = choose_tasks(samples, sampling, epoch)
        is_question = [question is not None for question in questions]
        trained_captions, questions, paraphrased = choose_paraphrases(samples, questions, sampling, epoch)
        batch["question"], batch["answer"], batch["trained_caption"] = questions, answers, trained_captions
        batch["is_question"] = torch.tensor(is_question, dtype=torch.bool)
        batch["paraphrased"] = torch.tensor(paraphrased, dtype=torch.bool)
        batch["input_ids"], batch["attention_mask"], batch["target_mask"] = lm_inputs(trained_captions, questions, answers)
        if tokenize is not None:
            batch["text_ids"], batch["text_mask"] = tokenize(batch["caption"])
    elif tokenize is not None:
        batch["input_ids"], batch["attention_mask"] = tokenize(batch["caption"])
    return batch


def slot_batches(plan: ShardPlan, slot: int, start_batch: int, tokenize: Tokenize | None = None,
                 lm_inputs: LmInputs | None = None, sampling: QuestionSampling | None = None) -> Iterator[dict[str, Any]]:
    """Slot `slot`'s micro-batches forever (epoch after epoch), from its `start_batch`-th on."""
    epoch, skip = plan.locate(start_batch)
    while True:
        stream = _slot_samples(plan, epoch, slot)
        for batch_index in range(plan.batches_per_slot):
            raw = [next(stream) for _ in range(plan.micro_batch_size)]
            if batch_index < skip:  # replaying up to the resume point: no decoding
                continue
            batch = collate_features([_decode(sample, epoch) for sample in raw], tokenize, lm_inputs, sampling, epoch)
            batch["epoch"] = epoch
            yield batch
        skip = 0
        epoch += 1


class FeatureBatchStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of micro-batches; use with `DataLoader(batch_size=None)`.

    `start_position` is the number of this rank's micro-batches already consumed (the saved data
    position). Each yielded batch carries `position`, its index in the rank's sequence.
    """

    def __init__(self, plan: ShardPlan, rank: int, start_position: int = 0, tokenize: Tokenize | None = None,
                 lm_inputs: LmInputs | None = None, sampling: QuestionSampling | None = None):
        super().__init__()
        self.plan = plan
        self.rank = rank
        self.start_position = start_position
        self.tokenize = tokenize
        self.lm_inputs = lm_inputs
        self.sampling = sampling

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        workers = self.plan.workers_per_rank
        # Rotate so that DataLoader worker 0 (asked first) holds the rank's next batch.
        worker = (loader_worker + self.start_position) % workers
        first = self.start_position // workers + (1 if worker < self.start_position % workers else 0)
        slot = self.rank * workers + worker
        for offset, batch in enumerate(slot_batches(self.plan, slot, first, self.tokenize, self.lm_inputs, self.sampling)):
            batch["position"] = (first + offset) * workers + worker
            yield batch


def reset_worker_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a forked worker inherits the trainer's SIGTERM/SIGUSR2 handlers,
    which only set a flag the worker never reads. SIGTERM gets its default back, so it ends the
    worker; SIGUSR2 (Slurm's warning, forwarded to every process of the step) is for the trainer,
    which checkpoints with the batches the worker still serves: the worker ignores it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def build_train_loader(
    plan: ShardPlan, rank: int, start_position: int, tokenize: Tokenize | None = None, pin_memory: bool = False,
    lm_inputs: LmInputs | None = None, sampling: QuestionSampling | None = None,
) -> torch.utils.data.DataLoader:
    """An endless DataLoader over this rank's micro-batches, starting after `start_position`
    (`pin_memory` on GPUs, so the copies to the device can be non-blocking; `lm_inputs` and
    `sampling`: questions beside captions, see `collate_features`)."""
    return torch.utils.data.DataLoader(
        FeatureBatchStream(plan, rank, start_position, tokenize, lm_inputs, sampling),
        batch_size=None,
        num_workers=plan.num_workers,
        persistent_workers=plan.num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=reset_worker_signals,
        # Its own generator: starting workers must not draw from the global torch RNG, which
        # training restores from the checkpoint (MoE token selection draws from it).
        generator=torch.Generator().manual_seed(plan.seed),
    )


# CapFilt decisions that kept the sample's web caption; the processing stage writes it first.
WEB_KEPT_DECISIONS = ("keep_web", "keep_web_and_synthetic")
SYNTHETIC_ONLY_DECISION = "keep_synthetic"


def web_caption_count(decision: str, captions: list[str]) -> int:
    """How many of a feature sample's kept captions (the first ones) are web captions: 1 when CapFilt
    kept the web caption, 0 when it kept only BLIP's synthetic ones, all of them for shards whose
    samples carry no CapFilt decision (made by another tool: nothing marks a caption synthetic)."""
    if decision in WEB_KEPT_DECISIONS:
        return 1
    if decision == SYNTHETIC_ONLY_DECISION:
        return 0
    return len(captions)


def _heldout_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_features` plus what evaluation scores against: per sample the web captions the filter
    kept (`references`) with their CLIP text embeddings (`reference_clip_texts`, (R, D)), and BLIP's
    synthetic captions (`synthetic_references`), which are scored apart, never as references."""
    batch = collate_features(samples)
    webs = [web_caption_count(sample["decision"], sample["captions"]) for sample in samples]
    batch["references"] = [sample["captions"][:web] for sample, web in zip(samples, webs)]
    batch["reference_clip_texts"] = [sample["clip_texts"][:web] for sample, web in zip(samples, webs)]
    batch["synthetic_references"] = [sample["captions"][web:] for sample, web in zip(samples, webs)]
    return batch


def iterate_heldout(
    shards: list[Path], batch_size: int, max_samples: int, rank: int = 0, world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Held-out batches in file order (first kept caption as the loss target; `_heldout_batch`'s
    references and synthetic captions): of the first `max_samples` samples, those with
    index % world_size == rank (one rank's share)."""
    samples: list[dict[str, Any]] = []
    for index, raw in enumerate(_raw_samples([str(path) for path in shards])):
        if index >= max_samples:
            break
        if index % world_size != rank:
            continue
        sample = _decode(raw, epoch=0)
        if not sample["captions"]:
            continue  # a question-only sample: no caption to score (`iterate_heldout_questions` has it)
        sample["caption"], sample["caption_index"], sample["clip_text"] = sample["captions"][0], 0, sample["clip_texts"][0]
        samples.append(sample)
        if len(samples) == batch_size:
            yield _heldout_batch(samples)
            samples = []
    if samples:
        yield _heldout_batch(samples)


def iterate_heldout_questions(
    shards: list[Path], batch_size: int, max_samples: int, rank: int = 0, world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Held-out question batches in file order: of the first `max_samples` samples that hold a
    question, those with question index % world_size == rank; each batch is `collate_features` plus
    `question`, `answers`, `answer_type`, `question_type` lists (what `vlpdist.eval.vqa` scores)."""
    samples: list[dict[str, Any]] = []

    def finished(samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_features(samples)
        for key in ("question", "answers", "question_type", "answer_type"):
            batch[key] = [sample["qa"].get(key, "" if key != "answers" else []) for sample in samples]
        return batch

    index = 0
    for raw in _raw_samples([str(path) for path in shards]):
        if index >= max_samples:
            break
        sample = _decode(raw, epoch=0)
        if not sample["qa"]:
            continue
        index += 1
        if (index - 1) % world_size != rank:
            continue
        samples.append(sample)
        if len(samples) == batch_size:
            yield finished(samples)
            samples = []
    if samples:
        yield finished(samples)


def clip_width_of(shard: Path) -> int:
    """D, the width of the CLIP image embeddings in `shard` (read off its first sample, whatever its kind)."""
    from vlpdist.data.feature_format import decode_feature_sample

    return int(decode_feature_sample(next(_raw_samples([str(shard)]))).image_embedding.shape[0])
