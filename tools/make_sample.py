"""Regenerate the bundled sample (pipeline/sample/): short English clips with known text.

Run once by a developer (needs espeak-ng); the clips and manifest are committed, so the job's
demo needs no download. Some clips are stored at other rates or in stereo on purpose, to
exercise resampling and downmixing.

    python -m tools.make_sample
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from tools.synth import synthesize

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "sample"

# (id, text, espeak voice, words per minute, stored rate, stored channels)
CLIPS = [
    ("sample-01", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "en-us", 150, 16_000, 1),
    ("sample-02", "PLEASE CALL STELLA AND ASK HER TO BRING THESE THINGS", "en-gb", 160, 16_000, 1),
    ("sample-03", "SPEECH RECOGNITION TURNS AUDIO INTO TEXT", "en-us+f3", 140, 22_050, 1),
    ("sample-04", "THE BATCH JOB RUNS ON A CLUSTER OF MACHINES", "en-gb-x-rp", 155, 44_100, 2),
    ("sample-05", "EVERY INPUT ROW YIELDS EXACTLY ONE OUTPUT ROW", "en-us+m3", 165, 16_000, 1),
    ("sample-06", "GOOD MORNING", "en-029", 150, 8_000, 1),
]


def main() -> None:
    SAMPLE_DIR.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip_id, text, voice, wpm, rate, channels in CLIPS:
        audio = synthesize(text.lower(), voice=voice, speed_wpm=wpm, sample_rate=rate)
        if channels == 2:
            # A slightly different right channel, so downmixing is really averaging two signals.
            right = np.concatenate([np.zeros(11, np.float32), audio[:-11]]) * 0.8
            audio = np.stack([audio, right], axis=1)
        name = f"{clip_id}.flac"
        sf.write(SAMPLE_DIR / name, audio, rate, subtype="PCM_16")
        rows.append({"id": clip_id, "path": name, "text": text})
    with open(SAMPLE_DIR / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "path", "text"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} clips to {SAMPLE_DIR}")


if __name__ == "__main__":
    main()
