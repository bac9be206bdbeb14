"""Pytree helpers every module may use (a leaf: it imports nothing of the package)."""

from __future__ import annotations


def path_name(path) -> str:
    """'train/params/layers/mlp/dense_h_to_4h/kernel': one spelling for dict keys, attributes and indices, so a
    stored tree (all dicts) and a live one (dataclasses, named tuples) name their leaves alike."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)
