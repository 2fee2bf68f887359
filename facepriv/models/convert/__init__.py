"""Converters from foreign weight formats (TensorFlow graphs, ...) into torch state dicts."""
