"""The activation shard format (DESIGN §4): ``format`` (manifest, sample decoding), ``writer`` (tar samples
laid out in reusable buffers), ``reader`` (the token-shuffled webdataset stream) and ``pagecache`` (keeping
a shard set that is read once out of the page cache, where the platform allows)."""
