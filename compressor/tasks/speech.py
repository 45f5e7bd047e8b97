"""Synthetic speech recognition tasks made offline (the setting of Narang et al. 2017).

* ``digits``: spoken strings of 3–6 digits ("three one four").
* ``sentences``: 3–6 word fragments of the King James Bible; test fragments come from the last
  10 % of the text only.

Utterances are spoken by espeak-ng (8 English accents × ~100 voice variants, random speed and
pitch) with white noise at 10–30 dB SNR and turned into 64 log-mel features
(:mod:`compressor.tasks.audio`).  The ``test`` split uses voice variants never heard in
training; the ``flite`` split uses a different synthesizer altogether.  Generation is parallel,
deterministic by seed, shows a progress bar and is cached on disk (``$COMPRESS_AND_EXPORT_CACHE``,
default ``~/.cache/compress-and-export``).  The model is trained with CTC over the 29-symbol
alphabet of :mod:`compressor.tasks.text`; the metrics are CER and WER of greedy decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .audio import ESPEAK_ACCENTS, FLITE_VOICES, Voice, add_noise, espeak_variants, log_mel, synthesize
from .metrics import ctc_greedy_decode, error_rate
from .text import encode, king_james_words, split_point

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CORPUS_VERSION = 2


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_AND_EXPORT_CACHE", Path.home() / ".cache" / "compress-and-export"))


@dataclass(frozen=True)
class SpeechCorpusSpec:
    """What to generate; every field is part of the cache key."""

    kind: str = "digits"
    train_size: int = 4000
    test_size: int = 400
    flite_size: int = 200
    seed: int = 0
    n_mels: int = 64
    min_snr_db: float = 10.0
    max_snr_db: float = 30.0
    held_out_variants: float = 0.2
    text_test_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("digits", "sentences"):
            raise ValueError(f"unknown speech corpus {self.kind!r}: use digits or sentences")

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": CORPUS_VERSION}, sort_keys=True).encode()
        return f"{self.kind}-{hashlib.sha256(blob).hexdigest()[:12]}"


#: the corpora the shipped checkpoints, the command line and the benchmarks use
STANDARD_CORPORA = {"digits": SpeechCorpusSpec(kind="digits", train_size=4000, test_size=400, flite_size=200),
                    "sentences": SpeechCorpusSpec(kind="sentences", train_size=8000, test_size=400, flite_size=200)}


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: Voice
    snr_db: float
    noise_seed: int


def _voices(spec: SpeechCorpusSpec) -> tuple[list[str], list[str]]:
    """espeak-ng variants for training and the held-out ones for the test split."""
    variants = list(espeak_variants())
    random.Random(spec.seed).shuffle(variants)
    n_test = max(1, int(round(len(variants) * spec.held_out_variants)))
    return sorted(variants[n_test:]), sorted(variants[:n_test])


def plan(spec: SpeechCorpusSpec, split: str) -> list[Utterance]:
    """The utterances of a split, decided by the seed alone."""
    rng = random.Random(f"{spec.seed}-{split}")
    size = {"train": spec.train_size, "test": spec.test_size, "flite": spec.flite_size}[split]
    if spec.kind == "sentences":
        words = king_james_words()
        cut = split_point(len(words), spec.text_test_fraction)
        lo, hi = (0, cut) if split == "train" else (cut, len(words))
    train_variants, test_variants = _voices(spec)
    utterances = []
    for _ in range(size):
        if spec.kind == "digits":
            text = " ".join(DIGIT_WORDS[rng.randrange(10)] for _ in range(rng.randint(3, 6)))
        else:
            n = rng.randint(3, 6)
            start = rng.randrange(lo, hi - n)
            text = " ".join(words[start:start + n])
        if split == "flite":
            voice = Voice("flite", rng.choice(FLITE_VOICES))
        else:
            variant = rng.choice(train_variants if split == "train" else test_variants)
            voice = Voice("espeak-ng", f"{rng.choice(ESPEAK_ACCENTS)}+{variant}", rng.randint(120, 200),
                          rng.randint(20, 80))
        utterances.append(Utterance(text, voice, rng.uniform(spec.min_snr_db, spec.max_snr_db), rng.getrandbits(32)))
    return utterances


def _features(job: tuple[Utterance, int]) -> np.ndarray:
    utterance, n_mels = job
    samples, rate = synthesize(utterance.text, utterance.voice)
    noisy = add_noise(samples, utterance.snr_db, np.random.default_rng(utterance.noise_seed))
    return log_mel(noisy, rate, n_mels).astype(np.float16)


@dataclass
class SpeechSplit:
    """Features ``[n_mels, frames]`` (float16) and transcripts of one split."""

    features: list[np.ndarray]
    texts: list[str]
    voices: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _save_split(path: Path, split: SpeechSplit) -> None:
    offsets = np.cumsum([0] + [f.shape[1] for f in split.features])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=np.concatenate(split.features, axis=1), offsets=offsets,
             texts=np.array(split.texts), voices=np.array(split.voices))
    os.replace(tmp, path)


def _load_split(path: Path) -> SpeechSplit:
    with np.load(path) as data:
        features, offsets = data["features"], data["offsets"]
        return SpeechSplit([features[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])],
                           [str(t) for t in data["texts"]], [str(v) for v in data["voices"]])


def load_corpus(spec: SpeechCorpusSpec, workers: int | None = None, progress: bool = True,
                splits: tuple[str, ...] = ("train", "test", "flite")) -> dict[str, SpeechSplit]:
    """The corpus of ``spec``: read from the cache, or generated in parallel and cached."""
    directory = cache_dir() / "speech" / spec.key()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spec.json").write_text(json.dumps(asdict(spec), indent=2))
    corpus = {}
    for split in splits:
        path = directory / f"{split}.npz"
        if not path.exists():
            utterances = plan(spec, split)
            jobs = [(u, spec.n_mels) for u in utterances]
            # threads suffice: the synthesizer is a subprocess and numpy's FFT releases the GIL
            with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
                features = list(tqdm(pool.map(_features, jobs), total=len(jobs),
                                     desc=f"synthesizing {spec.kind}/{split}", disable=not progress, leave=False))
            _save_split(path, SpeechSplit(features, [u.text for u in utterances], [str(u.voice) for u in utterances]))
        corpus[split] = _load_split(path)
    return corpus


def collate(split: SpeechSplit, indices: list[int]) -> dict[str, torch.Tensor]:
    """Padded batch: ``features [b, 1, n_mels, T]``, ``lengths``, concatenated ``targets``, ``target_lengths``."""
    feats = [split.features[i] for i in indices]
    longest = max(f.shape[1] for f in feats)
    batch = np.zeros((len(feats), 1, feats[0].shape[0], longest), np.float32)
    for row, f in enumerate(feats):
        batch[row, 0, :, : f.shape[1]] = f
    targets = [encode(split.texts[i]) for i in indices]
    return {
        "features": torch.from_numpy(batch),
        "lengths": torch.tensor([f.shape[1] for f in feats]),
        "targets": torch.tensor([c for t in targets for c in t]),
        "target_lengths": torch.tensor([len(t) for t in targets]),
        "texts": [split.texts[i] for i in indices],
    }


class SpeechTask:
    """CTC training and CER/WER evaluation on a :class:`SpeechCorpusSpec` corpus.

    The model maps ``features [b, 1, n_mels, T]`` to logits ``[b, T', 29]`` and has
    ``output_lengths(lengths)`` (like :class:`compressor.zoo.DeepSpeech2`).  Training batches
    hold utterances of similar length (a random bucket of the length-sorted training set), so
    padding stays small without ``pack_padded_sequence``."""

    metric = "cer"
    higher_is_better = False

    def __init__(self, spec: SpeechCorpusSpec = SpeechCorpusSpec(), batch_size: int = 32, progress: bool = True,
                 eval_limit: int | None = None) -> None:
        self.spec, self.batch_size, self.eval_limit = spec, batch_size, eval_limit
        self.name = f"speech-{spec.kind}"
        self.corpus = load_corpus(spec, progress=progress)
        order = np.argsort([f.shape[1] for f in self.corpus["train"].features], kind="stable")
        self.buckets = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]

    def batches(self, generator: torch.Generator) -> Iterator[dict]:
        while True:
            bucket = self.buckets[int(torch.randint(len(self.buckets), (1,), generator=generator))]
            yield collate(self.corpus["train"], bucket)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        log_probs = model(batch["features"]).log_softmax(-1)
        lengths = model.output_lengths(batch["lengths"])
        return nn.functional.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"],
                                      zero_infinity=True)

    @torch.no_grad()
    def transcribe(self, model: nn.Module, split: str = "test") -> tuple[list[str], list[str]]:
        """(references, greedy hypotheses) of a split."""
        data = self.corpus[split]
        count = len(data) if self.eval_limit is None else min(len(data), self.eval_limit)
        order = sorted(range(count), key=lambda i: data.features[i].shape[1])
        references, hypotheses = [], []
        was_training = model.training
        model.eval()
        for start in range(0, count, 64):
            batch = collate(data, order[start:start + 64])
            log_probs = model(batch["features"]).log_softmax(-1)
            hypotheses += ctc_greedy_decode(log_probs, model.output_lengths(batch["lengths"]))
            references += batch["texts"]
        model.train(was_training)
        return references, hypotheses

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        references, hypotheses = self.transcribe(model, split)
        return {"cer": error_rate(references, hypotheses),
                "wer": error_rate([r.split() for r in references], [h.split() for h in hypotheses])}
