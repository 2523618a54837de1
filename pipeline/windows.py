"""Long recordings as overlapping windows. Pure: no Ray, no torch.

A recording longer than one window is cut the way the transformers ASR pipeline cuts it
(``chunk_length_s``, ``stride_length_s``; its ``chunk_iter`` and ``rescale_stride``, reproduced
here step for step so the transcripts agree): windows of ``length`` samples, each overlapping the
one before by ``left + right``; each window is normalised on its own and run through the model,
the frames of its strides are dropped, and the frames left, in order, are the recording's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Samples ``[start, stop)`` of a recording, of whose output frames ``[first, last)`` are kept."""

    start: int
    stop: int
    first: int
    last: int


@dataclass(frozen=True)
class Windowing:
    """Window and stride lengths in samples, multiples of the model's ``hop`` (samples per frame) at
    ``rate`` samples per second, and whether each window is normalised on its own (as the model's
    feature extractor does an input)."""

    length: int
    left: int
    right: int
    hop: int
    rate: int
    normalize: bool = True

    @classmethod
    def of(cls, window_s: float, stride_s: tuple[float, float], rate: int, hop: int,
           normalize: bool = True) -> Windowing:
        """Seconds rounded to whole frames, as the pipeline rounds ``chunk_length_s`` and ``stride_length_s``."""

        def frames(seconds: float) -> int:
            return int(round(seconds * rate / hop) * hop)

        return cls(frames(window_s), frames(stride_s[0]), frames(stride_s[1]), hop, rate, normalize)

    def seconds(self, frame: int) -> float:
        """Where output frame ``frame`` of a recording starts, in seconds (as the pipeline's timestamps)."""
        return frame * self.hop / self.rate

    @property
    def step(self) -> int:
        """Samples from one window's start to the next one's."""
        return self.length - self.left - self.right

    def windows(self, samples: int) -> list[Window]:
        """The windows of a recording of ``samples`` samples; one whole window (every frame kept) when it
        fits in one."""
        if samples <= self.length:
            return [Window(0, samples, 0, samples)]
        out = []
        for start in range(0, samples, self.step):
            left = 0 if start == 0 else self.left
            last = start + self.length >= samples
            right = 0 if last else self.right
            size = min(start + self.length, samples) - start
            if size > left:  # a last window inside the one before's right stride adds nothing
                frames = int(round(size / self.hop))
                out.append(Window(start, start + size, int(round(left / size * frames)),
                                  frames - int(round(right / size * frames))))
            if last:
                break
        return out
