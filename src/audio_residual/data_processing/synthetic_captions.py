"""Generated captioned audio whose captions describe the sound: for tests, the demo and the tiny pretrained CLAP.

Each clip draws attributes — sound family (tone, noise, clicks, chirp, hum), pitch (low, high), loudness
(quiet, loud), onset (early, late) and, where the family has them, rate (slow, fast: clicks, hum), chirp
direction (rising, falling) and band (narrow, wide: noise) — renders them, and gets several captions
composed from those attribute words in different phrasings and with different subsets of attributes
(paraphrases). The vocabulary is small and compositional on purpose: a text tower trained from scratch
on it learns what each word means. `make_attribute_classes` writes a labelled (ESC-50-shaped) set whose
classes are fixed attribute combinations named by their words (e.g. `low_tone`), for zero-shot tests.

Held-out split: `HELD_OUT_COMBINATIONS` never occur with `combinations="seen"` (the tiny CLAP's pretraining
data), while each of their parts does; `combinations="held_out"` draws only them, captioned in phrasings the
pretraining captions never use (`HELD_OUT_PHRASINGS`) and always naming the held-out words. A model
pretrained on "seen" data and scored on "held_out" data is tested on compositional generalisation: known
words and sounds, in combinations and sentences it never met.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from audio_residual.data_processing.captions import CAPTIONS_CSV
from audio_residual.data_processing.datasets import ESC50_CSV
from audio_residual.data_processing.synthetic import GENERATOR_JSON, _replace_dir

CAPTION_GENERATOR_VERSION = 3
ATTRIBUTES_CSV = Path("meta") / "attributes.csv"
FAMILIES = ("tone", "noise", "clicks", "chirp", "hum")
ATTRIBUTE_VALUES = {
    "family": FAMILIES,
    "pitch": ("low", "high"),
    "loudness": ("quiet", "loud"),
    "onset": ("early", "late"),
    "rate": ("slow", "fast"),  # clicks, hum
    "direction": ("rising", "falling"),  # chirp
    "band": ("narrow", "wide"),  # noise
}
FAMILY_ATTRIBUTES = {"clicks": ("rate",), "hum": ("rate",), "chirp": ("direction",), "noise": ("band",)}
# Every word a caption or a class prompt uses: the tiny pretrained CLAP's tokenizer is trained on these.
CAPTION_WORDS = (
    "a an the sound of this is that starts early late starting and it A An The This , . " + " ".join(v for values in ATTRIBUTE_VALUES.values() for v in values)
)
SAMPLE_RATE = 48_000
# Held out of the tiny CLAP's pretraining: a family at one pitch. Its parts stay seen (the family at its other
# pitch, the pitch in other families); tone and chirp stay whole (the saliency tests' sounds).
HELD_OUT_COMBINATIONS = (
    {"family": "hum", "pitch": "high"},
    {"family": "clicks", "pitch": "low"},
    {"family": "noise", "pitch": "high"},
)
COMBINATIONS = ("all", "seen", "held_out")
PHRASINGS = ("pretraining", "held_out")
HELD_OUT_PHRASINGS = 3  # sentence shapes only held-out captions use (`_held_out_phrase`)


def draw_attributes(rng: np.random.Generator, fixed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Attributes of one clip: `fixed` ones as given, the family's others drawn uniformly."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(ATTRIBUTE_VALUES)
    if unknown:
        raise ValueError(f"unknown attribute(s) {sorted(unknown)}; known: {sorted(ATTRIBUTE_VALUES)}")
    family = fixed.get("family") or str(rng.choice(FAMILIES))
    names = ("pitch", "loudness", "onset", *FAMILY_ATTRIBUTES.get(family, ()))
    attributes = {"family": family}
    for name in names:
        attributes[name] = fixed.get(name) or str(rng.choice(ATTRIBUTE_VALUES[name]))
    return attributes


def held_out_combination(attributes: Mapping[str, str]) -> dict[str, str] | None:
    """The held-out combination these attributes contain, or None."""
    for combination in HELD_OUT_COMBINATIONS:
        if all(attributes.get(name) == value for name, value in combination.items()):
            return dict(combination)
    return None


def draw_clip_attributes(rng: np.random.Generator, combinations: str = "all") -> dict[str, str]:
    """One clip's attributes: any combination, only seen ones (redrawn until seen) or one held-out one."""
    if combinations not in COMBINATIONS:
        raise ValueError(f"combinations must be one of {COMBINATIONS}, got {combinations!r}")
    if combinations == "held_out":
        return draw_attributes(rng, HELD_OUT_COMBINATIONS[int(rng.integers(len(HELD_OUT_COMBINATIONS)))])
    while True:
        attributes = draw_attributes(rng)
        if combinations == "all" or held_out_combination(attributes) is None:
            return attributes


# Each family sounds in its own frequency region, one for "low" and one for "high" (Hz, log-uniform within):
# the regions interleave, so pitch words and family words are both heard in where the energy lies, and
# each family also keeps its own texture (harmonics, noise, impulses, sweeps, amplitude modulation).
REGIONS = {
    "tone": ((80, 120), (1100, 1500)),
    "hum": ((140, 200), (1700, 2300)),
    "chirp": ((230, 320), (2600, 3400)),
    "noise": ((380, 560), (4000, 5500)),
    "clicks": ((650, 950), (6500, 9000)),
}


def _uniform(rng, low_range, high_range, pick_high: bool) -> float:
    lo, hi = high_range if pick_high else low_range
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _event(attributes: Mapping[str, str], t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The sound itself (before onset and level), from its family, pitch and family attributes."""
    family, high = attributes["family"], attributes["pitch"] == "high"
    f = _uniform(rng, *REGIONS[family], high)
    fast = attributes.get("rate") == "fast"
    if family == "tone":
        return sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi)) / h**2 for h in range(1, 4))
    if family == "noise":
        half_width = 1.08 if attributes["band"] == "narrow" else 1.35
        spectrum = np.fft.rfft(rng.standard_normal(t.size))
        freqs = np.fft.rfftfreq(t.size, t[1] - t[0])
        spectrum[(freqs < f / half_width) | (freqs > f * half_width)] = 0
        return np.fft.irfft(spectrum, n=t.size)
    if family == "clicks":
        rate = _uniform(rng, (2, 4), (12, 20), fast)
        since = np.mod(t + rng.uniform(0, 1 / rate), 1 / rate)
        return np.sin(2 * np.pi * f * since) * np.exp(-since * f / 20)
    if family == "chirp":
        start, end = (f / 1.2, f * 1.2) if attributes["direction"] == "rising" else (f * 1.2, f / 1.2)
        sweep = 0.5
        k = np.log(end / start) / sweep
        return np.sin(2 * np.pi * start * (np.exp(k * np.mod(t, sweep)) - 1) / k)
    modulation = _uniform(rng, (1.5, 3), (10, 16), fast)
    return 0.5 * (1 + np.sin(2 * np.pi * modulation * t)) * np.sin(2 * np.pi * f * t)


def render(attributes: Mapping[str, str], seconds: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One clip of `seconds`: the event placed at its onset, at its loudness, over faint background noise."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    event = np.asarray(_event(attributes, t, rng), dtype=np.float64)
    event /= np.max(np.abs(event)) + 1e-12
    onset = int(n * (rng.uniform(0.0, 0.05) if attributes["onset"] == "early" else rng.uniform(0.4, 0.55)))
    envelope = np.zeros(n)
    envelope[onset:] = 1.0
    fade = min(int(0.01 * sample_rate), n - onset)
    envelope[onset : onset + fade] = np.linspace(0.0, 1.0, fade)
    level = rng.uniform(0.03, 0.08) if attributes["loudness"] == "quiet" else rng.uniform(0.5, 0.9)
    clip = level * envelope * event + rng.uniform(0.001, 0.003) * rng.standard_normal(n)
    return np.clip(clip, -1.0, 1.0)


def _adjectives(attributes: Mapping[str, str], rng: np.random.Generator, keep: float, always=()) -> list[str]:
    """Adjective words of the attributes (not family, not onset), each kept with probability `keep` (those of
    `always` always)."""
    order = ("loudness", "rate", "pitch", "direction", "band")
    return [attributes[name] for name in order if name in attributes and (name in always or rng.random() < keep)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _held_out_phrase(attributes: Mapping[str, str], adjectives: list[str], onset: bool, style: int) -> str:
    """The held-out captions' sentence shapes: words of the pretraining captions, in an order none of them has."""
    family, noun = attributes["family"], " ".join([*adjectives, attributes["family"]])
    if style == 0:
        return f"the {noun} starts {attributes['onset']}"
    if style == 1:
        return f"it is {_article(noun)} {noun}" + (f" and it starts {attributes['onset']}" if onset else "")
    text = f"{_article(family)} {family} sound that is {' and '.join(adjectives)}"
    return text + (f", starting {attributes['onset']}" if onset else "")


def compose_caption(attributes: Mapping[str, str], rng: np.random.Generator, held_out: bool = False) -> str:
    """One caption: the family word always, a random subset of the other attributes, one of several phrasings.

    `held_out`: one of the `HELD_OUT_PHRASINGS` (never a pretraining caption's shape), naming the words of the
    held-out combination the attributes hold, if any, always."""
    family = attributes["family"]
    always = tuple(held_out_combination(attributes) or ()) if held_out else ()
    adjectives = _adjectives(attributes, rng, keep=rng.choice([0.5, 0.8, 1.0]), always=always)
    onset = f"that starts {attributes['onset']}" if rng.random() < 0.5 else ""
    noun = " ".join([*adjectives, family])
    style = int(rng.integers(0, HELD_OUT_PHRASINGS if held_out else 5))
    if held_out:
        text = _held_out_phrase(attributes, adjectives, bool(onset), style)
    elif style == 0:
        text = f"{_article(noun)} {noun} {onset}"
    elif style == 1:
        text = f"the sound of {_article(noun)} {noun} {onset}"
    elif style == 2 and adjectives:
        text = f"{_article(family)} {family} that is {' and '.join(adjectives)}"
        text += f", it starts {attributes['onset']}" if onset else ""
    elif style == 3:
        text = f"this is a sound of {noun} {onset}"
    else:
        text = f"{family}, " + ", ".join([*adjectives, f"starting {attributes['onset']}"])
    text = text.strip()
    if rng.random() < 0.5:  # sentence case and a full stop, as prompts are written
        text = text[0].upper() + text[1:] + "."
    return " ".join(text.split())


def class_name(fixed: Mapping[str, str]) -> str:
    """`{'pitch': 'low', 'family': 'tone'}` → `low_tone`: adjectives in caption order, then the family."""
    order = ("loudness", "rate", "pitch", "direction", "band")
    return "_".join([*(fixed[name] for name in order if name in fixed), fixed["family"]])


def _stage(out_dir: Path, params: dict, write) -> Path:
    """Write into a hidden sibling folder renamed into place; an identical existing set is reused."""
    generator_json = out_dir / GENERATOR_JSON
    if generator_json.is_file():
        if json.loads(generator_json.read_text()) == params:
            return out_dir
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a generated dataset; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        (staging / "audio").mkdir()
        (staging / "meta").mkdir()
        write(staging)
        (staging / GENERATOR_JSON).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def make_synthetic_captions(
    out_dir: Path | str,
    n_clips: int = 100,
    captions_per_clip: int = 5,
    seconds: float = 2.0,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    combinations: str = "all",
    phrasings: str | None = None,
) -> Path:
    """Write (or reuse) a folder of generated clips + `captions.csv` (filename,caption,split) + attributes.

    Byte-identical for identical arguments; splits are assigned in a seeded order (train/validation/test).
    `combinations`: "all" attribute combinations, only "seen" ones (none of `HELD_OUT_COMBINATIONS`: the tiny
    CLAP's pretraining data) or only "held_out" ones. `phrasings`: the "pretraining" sentence shapes or the
    "held_out" ones (whose captions of a held-out clip always name its held-out words); by default held-out
    phrasings for held-out combinations, else the pretraining ones.
    """
    out_dir = Path(out_dir)
    if n_clips < 3 or captions_per_clip < 1 or seconds <= 0:
        raise ValueError("n_clips must be >= 3 (one per split), captions_per_clip >= 1 and seconds > 0")
    if len(split_fractions) != 3 or min(split_fractions) <= 0:
        raise ValueError(f"split_fractions must be three positive numbers, got {list(split_fractions)}")
    if combinations not in COMBINATIONS:
        raise ValueError(f"combinations must be one of {COMBINATIONS}, got {combinations!r}")
    phrasings = phrasings or ("held_out" if combinations == "held_out" else "pretraining")
    if phrasings not in PHRASINGS:
        raise ValueError(f"phrasings must be one of {PHRASINGS}, got {phrasings!r}")
    params = {
        "kind": "captions", "format_version": CAPTION_GENERATOR_VERSION, "n_clips": n_clips,
        "captions_per_clip": captions_per_clip, "seconds": seconds, "seed": seed,
        "split_fractions": [float(f) for f in split_fractions], "sample_rate": SAMPLE_RATE,
        "combinations": combinations, "phrasings": phrasings,
    }  # fmt: skip
    return _stage(out_dir, params, lambda root: _write_captions(root, params))


def _splits(n: int, fractions: Sequence[float], seed: int) -> list[str]:
    total = sum(fractions)
    n_val = max(1, int(round(n * fractions[1] / total)))
    n_test = max(1, int(round(n * fractions[2] / total)))
    names = ["validation"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    order = np.random.default_rng([seed, 7]).permutation(n)
    return [names[i] for i in order]


def _write_captions(root: Path, params: dict) -> None:
    splits = _splits(params["n_clips"], params["split_fractions"], params["seed"])
    rows, attribute_rows = [], []
    for clip in tqdm(range(params["n_clips"]), desc="synthesising captioned clips", unit="clip", leave=False):
        rng = np.random.default_rng([params["seed"], clip])
        attributes = draw_clip_attributes(rng, params["combinations"])
        audio = render(attributes, params["seconds"], rng, params["sample_rate"])
        filename = f"audio/{clip:06d}.wav"
        sf.write(root / filename, audio, params["sample_rate"], subtype="PCM_16", format="WAV")
        captions: list[str] = []
        for _ in range(params["captions_per_clip"] * 4):  # distinct paraphrases where the phrasings allow
            text = compose_caption(attributes, rng, held_out=params["phrasings"] == "held_out")
            if text not in captions:
                captions.append(text)
            if len(captions) == params["captions_per_clip"]:
                break
        while len(captions) < params["captions_per_clip"]:
            captions.append(captions[len(captions) % len(captions)])
        rows += [(filename, text, splits[clip]) for text in captions]
        attribute_rows.append({"filename": filename, "split": splits[clip], **attributes})
    pd.DataFrame(rows, columns=["filename", "caption", "split"]).to_csv(root / CAPTIONS_CSV, index=False)
    pd.DataFrame(attribute_rows).to_csv(root / ATTRIBUTES_CSV, index=False)


def make_attribute_classes(
    out_dir: Path | str,
    classes: Sequence[Mapping[str, str]],
    clips_per_class: int = 10,
    n_folds: int = 5,
    seconds: float = 2.0,
    seed: int = 0,
) -> Path:
    """An ESC-50-shaped labelled set whose classes are attribute combinations (unnamed attributes drawn per clip).

    Category names are the attribute words (`class_name`), so a prompt "This is a sound of low tone" names
    the class in the words the captions use.
    """
    classes = [dict(c) for c in classes]
    names = [class_name(c) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"classes must differ: {names}")
    for fixed in classes:
        draw_attributes(np.random.default_rng(0), fixed)  # validates attribute names
    params = {
        "kind": "attribute_classes", "format_version": CAPTION_GENERATOR_VERSION, "classes": classes,
        "clips_per_class": clips_per_class, "n_folds": n_folds, "seconds": seconds, "seed": seed,
        "sample_rate": SAMPLE_RATE,
    }  # fmt: skip
    return _stage(Path(out_dir), params, lambda root: _write_classes(root, params, names))


def _write_classes(root: Path, params: dict, names: list[str]) -> None:
    rows = []
    jobs = [(target, clip) for target in range(len(names)) for clip in range(params["clips_per_class"])]
    for target, clip in tqdm(jobs, desc="synthesising labelled clips", unit="clip", leave=False):
        rng = np.random.default_rng([params["seed"], 1_000 + target, clip])
        audio = render(draw_attributes(rng, params["classes"][target]), params["seconds"], rng, params["sample_rate"])
        fold = clip % params["n_folds"] + 1
        filename = f"{fold}-{target * params['clips_per_class'] + clip:06d}-A-{target}.wav"
        sf.write(root / "audio" / filename, audio, params["sample_rate"], subtype="PCM_16", format="WAV")
        rows.append((filename, fold, target, names[target], False, f"{target:03d}{clip:03d}", "A"))
    columns = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    pd.DataFrame(rows, columns=columns).to_csv(root / ESC50_CSV, index=False)


# The 10 zero-shot classes of the tiny pretrained CLAP's acceptance test: every family at both pitches.
FAMILY_PITCH_CLASSES = tuple({"pitch": p, "family": f} for f in FAMILIES for p in ("low", "high"))
