"""Caption metrics with pycocoevalcap, the code behind the published COCO captioning tables.

PTB tokenization (Stanford CoreNLP, Java) first, then BLEU-1..4, ROUGE-L, CIDEr (and on request
METEOR, also Java, and SPICE, Java plus the Stanford CoreNLP jars pycocoevalcap fetches separately).
CIDEr's IDF comes from the references passed in, as in the COCO evaluation.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Hashable, Iterable

from vlpdist.errors import UserError


# What pycocoevalcap's SPICE loads besides spice-1.0.jar; without them its compute_score starts a download.
SPICE_STANFORD_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


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


def caption_metrics(
    references: dict[Hashable, list[str]], predictions: dict[Hashable, str], *, meteor: bool = False, spice: bool = False
) -> dict[str, float]:
    """Corpus scores {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr"[, "METEOR"][, "SPICE"]} of `predictions` against `references`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

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
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({keys[k]: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({keys[k]: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        # Meteor() starts a Java process; its __del__ stops it.
        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    if spice:
        from pycocoevalcap.spice.spice import Spice

        problem = optional_metric_problems()["SPICE"]
        if problem is not None:
            raise UserError(f"SPICE cannot run: {problem}")
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


def most_frequent_caption_baseline(train_captions: Iterable[str], eval_ids: Iterable[Hashable]) -> dict[Hashable, str]:
    """The trivial captioner: every eval id gets the training set's most frequent caption."""
    counts = Counter(caption.strip() for caption in train_captions)
    if not counts:
        raise UserError("most_frequent_caption_baseline needs at least one training caption")
    caption = counts.most_common(1)[0][0]
    return {key: caption for key in eval_ids}
