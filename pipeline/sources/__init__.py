"""Getting the images: URLs fetched resumably and verified, archives extracted safely,
and the datasets that ship inside a dependency (``builtin:``)."""
