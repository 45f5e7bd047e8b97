"""Speech task pieces: metrics, WAVE parsing, mel features, the offline corpus."""

import io
import wave

import numpy as np
import pytest
import torch

from compressor.tasks import audio
from compressor.tasks.metrics import bits_per_character, ctc_greedy_decode, edit_distance, error_rate
from compressor.tasks.speech import SpeechCorpusSpec, SpeechTask, load_corpus, plan
from compressor.tasks.text import ALPHABET, decode, encode, king_james_words, normalize, split_point


def test_edit_distance_and_error_rates():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert error_rate(["abcd", "ef"], ["abxd", "ef"]) == pytest.approx(1 / 6)
    assert error_rate([["one", "two"]], [["one", "three", "two"]]) == pytest.approx(0.5)
    assert bits_per_character(np.log(2)) == pytest.approx(1.0)


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    path = [encode("a")[0], encode("a")[0], 0, encode("a")[0], encode("b")[0], 0, 0]
    log_probs = torch.full((1, len(path), len(ALPHABET)), -10.0)
    log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert ctc_greedy_decode(log_probs, torch.tensor([len(path)])) == ["aab"]
    assert ctc_greedy_decode(log_probs, torch.tensor([2])) == ["a"]


def test_text_normalization_and_alphabet():
    assert len(ALPHABET) == 29 and ALPHABET[0] == "_"
    assert normalize("And God said, Let there be light: and there was light.") == \
        "and god said let there be light and there was light"
    assert normalize("Jacob's well-spring") == "jacob's well spring"
    assert decode(encode("in the beginning")) == "in the beginning"


def test_wave_parsing_and_mel_features():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        tone = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000) * 32767).astype("<i2")
        w.writeframes(tone.tobytes())
    samples, rate = audio._wav_samples(buffer.getvalue())
    assert rate == 16000 and samples.shape == (16000,) and abs(samples.max() - 0.5) < 1e-3
    bank = audio.mel_filterbank(16000, 512, 64)
    assert bank.shape == (64, 257) and np.all(bank >= 0) and np.all(bank.max(axis=1) > 0.5)
    features = audio.log_mel(samples, rate)
    assert features.shape == (64, 98)  # 1 s: 1 + (16000 − 400) // 160 frames
    assert np.allclose(features.mean(axis=1), 0, atol=1e-4)
    # a 1 kHz tone puts its energy in the mel bin whose filter peaks nearest 1 kHz
    raw = np.log(np.abs(np.fft.rfft(samples[:400] * np.hanning(400), n=512)) ** 2 @ bank.T + 1e-6)
    assert abs(int(np.argmax(raw)) - int(np.argmax(bank[:, round(1000 / (16000 / 512))]))) <= 1


def test_add_noise_hits_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = np.sin(np.linspace(0, 100, 20000)).astype(np.float32)
    noisy = audio.add_noise(clean, 20.0, rng)
    snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
    assert snr == pytest.approx(20.0, abs=0.3)


def test_synthesizers_speak():
    samples, rate = audio.synthesize("one two", audio.Voice("espeak-ng", "en-us+f3"))
    assert rate == 22050 and 0.3 * rate < samples.size < 3 * rate and np.abs(samples).max() > 0.05
    samples, rate = audio.synthesize("one two", audio.Voice("flite", "slt"))
    assert rate == 16000 and samples.size > 0.3 * rate
    assert len(audio.espeak_variants()) > 50


def test_plans_are_deterministic_and_splits_are_disjoint():
    spec = SpeechCorpusSpec(kind="sentences", train_size=300, test_size=100, flite_size=20)
    train, test = plan(spec, "train"), plan(spec, "test")
    assert train == plan(spec, "train")
    variant = lambda u: u.voice.name.split("+")[1]  # noqa: E731
    assert not {variant(u) for u in train} & {variant(u) for u in test}  # held-out voices
    words = king_james_words()
    tail = " ".join(words[split_point(len(words), 0.1) - 6:])
    assert all(u.text in tail for u in test)  # test text from the last 10 % only
    assert all(3 <= len(u.text.split()) <= 6 for u in train + test)
    assert {u.voice.engine for u in plan(spec, "flite")} == {"flite"}


def test_corpus_is_cached_and_task_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_AND_EXPORT_CACHE", str(tmp_path))
    spec = SpeechCorpusSpec(train_size=40, test_size=10, flite_size=5)
    corpus = load_corpus(spec, progress=False)
    assert {k: len(v) for k, v in corpus.items()} == {"train": 40, "test": 10, "flite": 5}
    files = sorted(p.name for p in (tmp_path / "speech" / spec.key()).iterdir())
    assert files == ["flite.npz", "spec.json", "test.npz", "train.npz"]
    again = load_corpus(spec, progress=False)  # from the cache
    assert all(np.array_equal(a, b) for a, b in zip(corpus["train"].features, again["train"].features))
    task = SpeechTask(spec, batch_size=8, progress=False)
    batch = next(task.batches(torch.Generator().manual_seed(0)))
    assert batch["features"].shape[:3] == (8, 1, 64)
    assert int(batch["target_lengths"].sum()) == batch["targets"].numel()
    from compressor.zoo import build_model

    model = build_model("ds2-mini", hidden=32)
    assert torch.isfinite(task.loss(model, batch))
    metrics = task.evaluate(model)
    assert set(metrics) == {"cer", "wer"} and metrics["cer"] > 0.5  # untrained
