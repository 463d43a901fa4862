"""The Forget-Me-Not engine: attention hooks, losses, training, patches, metrics.

Plain tensors and dataclasses in and out; the only module that touches ComfyUI objects is
`host`.
"""
__version__ = "0.1.0"
