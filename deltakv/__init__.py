"""DeltaKV: residual KV-cache compression. Compressor modules, reference selection, training, checkpoints.

Public pieces: ``ReferenceSpec`` / ``select_references`` (``deltakv.reference``), ``ResidualCompressor`` /
``DeltaKVCompressor`` / ``CompressorConfig`` (``deltakv.compressor``), ``save_compressor`` /
``load_compressor`` (``deltakv.checkpoint``), ``DeltaKVForTraining`` (``deltakv.model``).
"""

from deltakv.checkpoint import load_compressor, save_compressor
from deltakv.compressor import CompressorConfig, DeltaKVCompressor, ResidualCompressor
from deltakv.reference import ReferenceSpec, prototype_mask, prototype_positions, select_references

__all__ = [
    "CompressorConfig", "DeltaKVCompressor", "ReferenceSpec", "ResidualCompressor", "load_compressor",
    "prototype_mask", "prototype_positions", "save_compressor", "select_references",
]
