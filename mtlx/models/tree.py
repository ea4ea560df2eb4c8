"""Parameter-tree helpers shared by the model families and checkpoint I/O."""

from typing import Any

import flax.traverse_util


def flat_paths(tree: Any) -> dict:
    """{'a/b/kernel': leaf} for a nested mapping of parameters ('/'-joined string keys)."""
    return flax.traverse_util.flatten_dict(dict(tree), sep="/")
