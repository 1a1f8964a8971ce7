"""The model registry that services read: versions, lineage and the ``production`` alias,
laid out on a folder or an S3 prefix (docs/registry.md)."""
