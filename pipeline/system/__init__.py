"""Operating-system concerns: atomic files, full disks, child processes, provenance
(git, dvc.lock), re-hashing DVC's outputs (``verify``) and what the CPU offers."""
