"""transfer-pipeline: labelled images in, a validated, fine-tuned image classifier out.

The stages (``pipeline.stages``) run as ``python -m pipeline <stage>``, which dvc.yaml
calls; what they share lives in the support packages beside them. This file is not empty
because every stage lists it as a dep, and DVC warns about an empty dep on every command.
"""
