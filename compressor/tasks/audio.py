"""Offline speech synthesis and log-mel features.

Synthesizers are Debian's ``espeak-ng`` (English accents × voice variants, speed, pitch) and
``flite`` (voices kal, kal16, awb, rms, slt — a second synthesizer for an unseen-voice test).
Features: 25 ms Hann windows every 10 ms, power spectrum, ``n_mels`` triangular mel filters
(HTK mel scale, 0–8 kHz), ``log(mel + 1e-6)``, then per-utterance mean and variance
normalization of every bin.  Computed at the synthesizer's own sample rate (22,050 Hz for
espeak-ng, 8 or 16 kHz for flite), so no resampling is needed.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")


@dataclass(frozen=True)
class Voice:
    """One way of speaking: synthesizer, voice name, words per minute (espeak-ng) and pitch 0–99."""

    engine: str
    name: str
    speed: int = 160
    pitch: int = 50

    def __str__(self) -> str:
        return f"{self.engine}:{self.name}:{self.speed}:{self.pitch}"


@functools.cache
def espeak_variants() -> tuple[str, ...]:
    """The voice variants espeak-ng ships (``m1``, ``f3``, ``klatt``, …), sorted."""
    out = subprocess.run(["espeak-ng", "--voices=variant"], check=True, capture_output=True, text=True).stdout
    files = [token for line in out.splitlines()[1:] for token in line.split() if token.startswith("!v/")]
    return tuple(sorted({token[3:] for token in files}))


def _require(program: str, package: str) -> None:
    if shutil.which(program) is None:
        raise RuntimeError(f"{program} not found: the speech corpus needs Debian's {package} package "
                           f"(run scripts/setup.sh, or apt-get install {package})")


def _wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    """Mono 16-bit PCM samples and the sample rate of a RIFF/WAVE byte string.

    espeak-ng writes a streaming header with a placeholder data size, so the data chunk is read
    to the end of the bytes rather than trusted."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAVE file")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt ":
            channels, rate, _, _, bits = struct.unpack("<HIIHH", data[pos + 10:pos + 24])
            if channels != 1 or bits != 16:
                raise ValueError(f"expected mono 16-bit audio, got {channels} channels, {bits} bits")
        if chunk == b"data":
            pcm = data[pos + 8:]
            pcm = pcm[: len(pcm) // 2 * 2]
            return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size + (size & 1)
    raise ValueError("WAVE file has no data chunk")


def synthesize(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    """Speak ``text``: float32 samples in [-1, 1] and the sample rate."""
    if voice.engine == "espeak-ng":
        _require("espeak-ng", "espeak-ng")
        cmd = ["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text]
        return _wav_samples(subprocess.run(cmd, check=True, capture_output=True).stdout)
    if voice.engine == "flite":
        _require("flite", "flite")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "out.wav")
            subprocess.run(["flite", "-voice", voice.name, "-t", text, "-o", path], check=True, capture_output=True)
            with open(path, "rb") as f:
                return _wav_samples(f.read())
    raise ValueError(f"unknown synthesizer {voice.engine!r}: use espeak-ng or flite")


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at a signal-to-noise ratio of ``snr_db`` decibels."""
    power = float(np.mean(samples**2)) if samples.size else 0.0
    noise = rng.standard_normal(samples.shape).astype(np.float32)
    return samples + noise * np.float32(np.sqrt(power / 10 ** (snr_db / 10)))


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_max: float = 8000.0) -> np.ndarray:
    """``[n_mels, n_fft//2 + 1]`` triangular filters evenly spaced on the HTK mel scale,
    mel(f) = 2595·log10(1 + f/700)."""
    f_max = min(f_max, sample_rate / 2)
    mel = np.linspace(0.0, 2595 * np.log10(1 + f_max / 700), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (bins[None] - lower) / (center - lower)
    falling = (upper - bins[None]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def log_mel(samples: np.ndarray, sample_rate: int, n_mels: int = 64) -> np.ndarray:
    """``[n_mels, frames]`` normalized log-mel features (25 ms windows, 10 ms hop)."""
    win, hop = int(round(0.025 * sample_rate)), int(round(0.010 * sample_rate))
    n_fft = 1 << (win - 1).bit_length()
    if samples.size < win:
        samples = np.pad(samples, (0, win - samples.size))
    frames = 1 + (samples.size - win) // hop
    index = np.arange(win)[None, :] + hop * np.arange(frames)[:, None]
    spectrum = np.abs(np.fft.rfft(samples[index] * np.hanning(win).astype(np.float32), n=n_fft)) ** 2
    features = np.log(spectrum.astype(np.float64) @ mel_filterbank(sample_rate, n_fft, n_mels).T + 1e-6).T
    features -= features.mean(axis=1, keepdims=True)
    features /= np.maximum(features.std(axis=1, keepdims=True), 1e-3)  # constant bins stay 0
    return features.astype(np.float32)
