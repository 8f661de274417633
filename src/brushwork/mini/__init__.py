"""The bundled mini model's world: procedural scenes with captions (``scenes``) and a pixel checker (``checker``).

Importing this package imports no torch.
"""
