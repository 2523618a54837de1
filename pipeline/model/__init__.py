"""The model code: everything that imports torch or transformers lives in this package.

``spec`` (what the driver reads without torch), ``loading`` (device and precision), ``invariance``
(batch invariance and the encoder swaps, each checked by a probe), ``conv_encoder`` (the conv
layers as matmuls), ``ctc`` (greedy decoding), ``transcriber`` (the replica's pipelined batches)
and ``reference`` (the oracle). This file imports nothing, so ``pipeline.model.spec`` stays torch-free.
"""
