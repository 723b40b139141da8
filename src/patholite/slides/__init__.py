"""Whole-slide images: reading, tissue detection, tiling, annotations, synthetic slides, the pipelined
inference engine and its reports."""
