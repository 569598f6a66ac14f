"""Caption metrics with pycocoevalcap, the code behind the published COCO captioning tables.

PTB tokenization (Stanford CoreNLP, Java) first, then BLEU-1..4, ROUGE-L, CIDEr (and on request
METEOR, also Java, and SPICE, Java plus the Stanford CoreNLP jars pycocoevalcap fetches separately).
CIDEr's IDF comes from the references passed in, as in the COCO evaluation.

The PTB tokenizer reads one caption per line and its output lines are paired back with the
captions by position, so a caption holding a line break would shift every later caption onto
another image's references (one `\r` took corpus CIDEr from 5.98 to 1.81). pycocoevalcap only
replaces `\n`; here every line-breaking character becomes a space first, and the tokenizer's line
count is checked against the captions sent, so a mismatch is an error, never a shifted table.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Hashable, Iterable

from vlpdist.errors import UserError


# What pycocoevalcap's SPICE loads besides spice-1.0.jar; without them its compute_score starts a download.
SPICE_STANFORD_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# What Python's str.splitlines breaks on; it holds every character Stanford's PTB tokenizer (3.4.1)
# ends a line at (\r, \n, \x0b, \x0c, U+2028, U+2029; it reads \x1c-\x1e as spaces and \x85 as "...").
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAKS_TO_SPACES = str.maketrans(LINE_BREAKS, " " * len(LINE_BREAKS))


class TokenizerMismatch(RuntimeError):
    """The PTB tokenizer returned another number of lines than captions it was given."""


def one_line(caption: str) -> str:
    """The caption with every line-breaking character (`LINE_BREAKS`) replaced by a space."""
    return caption.translate(_LINE_BREAKS_TO_SPACES)


def run_ptb_tokenizer(sentences: list[str]) -> list[str]:
    """Stanford's PTB tokenizer (lower-cased, pycocoevalcap's jar and options) over `sentences`, one
    output line per sentence; `TokenizerMismatch` when the counts differ (a sentence held a line break)."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="vlpdist-ptb-") as scratch:
        # A file, as pycocoevalcap passes it, but in our own folder: the package folder may be read-only.
        source = Path(scratch) / "captions.txt"
        source.write_text("\n".join(sentences), encoding="utf-8")
        done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer (java) failed with exit code {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) != len(sentences):
        raise TokenizerMismatch(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions; "
                                "scores paired by position would be shifted, so none are given")
    return lines


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's `PTBTokenizer.tokenize` ({id: captions} -> {id: tokenised captions}, its
    punctuation removed), each caption made one line first and the line count checked."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    owners = [key for key, texts in captions.items() for _ in texts]
    lines = run_ptb_tokenizer([one_line(text) for texts in captions.values() for text in texts])
    tokenised: dict[str, list[str]] = {key: [] for key in captions}
    for key, line in zip(owners, lines):
        tokenised[key].append(" ".join(word for word in line.rstrip().split(" ") if word not in PUNCTUATIONS))
    return tokenised


def optional_metric_problems() -> dict[str, str | None]:
    """{"METEOR": None or why it cannot run here, "SPICE": likewise}."""
    import pycocoevalcap.spice.spice as spice_module  # pycocoevalcap is a namespace package: no __file__ of its own

    if shutil.which("java") is None:
        return {"METEOR": "no Java", "SPICE": "no Java"}
    lib = Path(spice_module.__file__).parent / "lib"
    missing = [jar for jar in SPICE_STANFORD_JARS if not (lib / jar).is_file()]
    spice = (f"{', '.join(missing)} missing from {lib} (python -c 'from pycocoevalcap.spice.get_stanford_models "
             "import get_stanford_models; get_stanford_models()' fetches them)") if missing else None
    return {"METEOR": None, "SPICE": spice}


_shared_meteor = None


def start_meteor():
    """pycocoevalcap's METEOR scorer, one per process: a Java process that loads its paraphrase tables
    at its first score (about 10 s), so every caption set of every evaluation in this process shares
    it; its `compute_score` keeps no state between calls (its `__del__` stops the process). A scorer
    whose process ended, or that a failed call left holding its lock, is replaced (call this from one
    thread at a time: a score under way in another thread would look like such a failure)."""
    from pycocoevalcap.meteor.meteor import Meteor

    global _shared_meteor
    old = _shared_meteor
    if old is None or old.meteor_p.poll() is not None or old.lock.locked():
        if old is not None:
            old.meteor_p.kill()
            if old.lock.locked():
                old.lock.release()  # its __del__ takes the lock: held, it would wait forever
        _shared_meteor = Meteor()
    return _shared_meteor


def caption_metrics(
    references: dict[Hashable, list[str]], predictions: dict[Hashable, str], *, meteor: bool = False, spice: bool = False,
) -> dict[str, float]:
    """Corpus scores {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr"[, "METEOR"][, "SPICE"]} of `predictions` against `references`.
    METEOR scores with the process's shared scorer (`start_meteor`)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(predictions):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:3]
        raise UserError(f"caption_metrics: references and predictions cover different ids (e.g. {missing})")
    if not references:
        raise UserError("caption_metrics: no captions to score")
    if any(not refs for refs in references.values()):
        raise UserError("caption_metrics: every id needs at least one reference caption")
    if shutil.which("java") is None:
        raise UserError("caption_metrics needs Java for the PTB tokenizer (pycocoevalcap); install a JRE")
    # pycocoevalcap keys by id and pairs PTB's output lines back by position: keep ids as plain strings.
    keys = {key: str(index) for index, key in enumerate(references)}
    gts = ptb_tokenize({keys[k]: list(refs) for k, refs in references.items()})
    res = ptb_tokenize({keys[k]: [predictions[k]] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        scores["METEOR"] = float(start_meteor().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        problem = optional_metric_problems()["SPICE"]
        if problem is not None:
            raise UserError(f"SPICE cannot run: {problem}")
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


def most_frequent_caption(train_captions: Iterable[str]) -> str:
    """The trivial captioner's one caption for every image: the most frequent training caption
    (stripped; ties go to the first seen)."""
    counts = Counter(caption.strip() for caption in train_captions)
    if not counts:
        raise UserError("the most-frequent-caption baseline needs at least one training caption")
    return counts.most_common(1)[0][0]
