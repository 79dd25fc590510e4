"""Where kdcache's files live: a local directory or an object store reached through fsspec.

    from pipeline.storage import is_url, store_for
    is_url("s3://bucket/cache")           # True: an fsspec protocol
    s = store_for("s3://bucket/cache")    # one `Store` per (URL, options) in a process
    s.write_bytes("_COMMIT.json", data)   # one PUT: visible whole or not at all

Prepared data, caches, training runs and evaluations may be stored remotely (`kdcache prepare --out URL`,
`kdcache teacher --out URL`, `kdcache train --out URL`, `kdcache eval --out URL`;
`teacher`, `train`, `eval`, `inspect`, `export`, `report` read `--data URL` and `--cache URL`); the data and
cache packages decide what goes where (`pipeline.data.remote`, `pipeline.cache.remote`), a training run
follows its local working copy (`pipeline.storage.synced`, `pipeline.training.remote`). One launch per remote
output: `pipeline.storage.lease`; files on their way up are written in `pipeline.storage.staging`.
Storage options (credentials, endpoints) come from the provider's usual places (environment variables,
~/.aws, gcloud's application credentials) and from `--storage-option key=value` or the environment variable
KDCACHE_STORAGE_OPTIONS (a JSON object); they are held in this process only, never written to a config,
a record, a log line or an error message.
"""

from pipeline.storage.store import Store, store_for
from pipeline.storage.urls import (
                                   configure,
                                   is_url,
                                   join,
                                   parse_storage_options,
                                   protocol,
                                   redact,
                                   refuse_url,
                                   storage_options,
                                   use_job_options,
)

__all__ = ["Store", "store_for", "configure", "is_url", "join", "parse_storage_options", "protocol", "redact",
           "refuse_url", "storage_options", "use_job_options"]
