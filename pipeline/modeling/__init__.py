"""Models and how they run: backbones, the classifier and its checkpoints, inference
engines and ONNX export, device and precision, image datasets and loaders, and what
training shares (the loss and its guards)."""
