"""corpus-transcribe: batch speech-to-text for large corpora with wav2vec2 CTC models on Ray Data."""

__version__ = "0.1.0"
