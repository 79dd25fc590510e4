"""The teacher cache: a sharded Zarr v3 store plus an Arrow row index (see `format` for the layout)."""

from pipeline.cache.reader import Cache, decode_rows, open_cache

__all__ = ["Cache", "open_cache", "decode_rows"]
