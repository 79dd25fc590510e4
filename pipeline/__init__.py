"""kdcache: an offline teacher-logit cache for distilling language models.

Stage one (`pipeline.teacher.runner`) runs a teacher once and writes a sharded Zarr v3 cache of top-K
log-probabilities, entropy and log-partition values (`pipeline.cache`). Stage two
(`pipeline.training.trainer`) distills any number of students against that cache, never loading the teacher.
"""

__version__ = "0.1.0"
