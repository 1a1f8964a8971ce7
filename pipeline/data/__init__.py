"""The data the stages pass along: image loading and preprocessing (one of each), the
Great Expectations suites, the split files and the feature store. Nothing here imports
torch: the torch-free predictor uses ``images`` and ``preprocessing``."""
