"""The teacher cache: a sharded Zarr v3 store plus an Arrow row index.

`layout` says where things live and what commits a shard, `schema` what a shard stores and how rows
are encoded (format 3), `codecs` the value codes, `writer` and `reader` the two sides.
"""

from pipeline.cache.reader import CONTRACT_FIELDS, Cache, open_cache
from pipeline.cache.schema import FORMAT_VERSION, CodecParams, RowCodec

__all__ = ["Cache", "open_cache", "CONTRACT_FIELDS", "FORMAT_VERSION", "CodecParams", "RowCodec"]
