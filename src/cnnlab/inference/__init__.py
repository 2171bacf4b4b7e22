"""Inference: weights files and their sidecars (weights.py), the scorer of a test split (evaluate.py, tta.py,
test_split.py), prediction on image files (predict.py) and export to ONNX or torch.export (export.py). Every
consumer preprocesses an image as its sidecar's `Preprocess` says (cnnlab.data.preprocess). The package exports
nothing itself; each module here is public."""
