"""What differs between two category lists [{id, name}]: the categories a checkpoint was trained on
against those of the dataset it meets (on resume, evaluation or inference)."""
from typing import Any, Dict, List, Mapping, Sequence

Categories = Sequence[Mapping[str, Any]]


def category_differences(trained: Categories, dataset: Categories, *, names=("checkpoint", "dataset")) -> List[str]:
    """Readable differences, none when the lists hold the same (id, name) pairs in any order:
    renamed (an id with another name), renumbered (a name under another id), and categories
    only one side has."""
    left, right = _by_id(trained), _by_id(dataset)
    left_ids, right_ids = {v: k for k, v in left.items()}, {v: k for k, v in right.items()}
    differences = []
    for category_id in sorted(left.keys() & right.keys()):
        if left[category_id] != right[category_id]:
            differences.append(f"id {category_id} is {left[category_id]!r} in the {names[0]} but {right[category_id]!r} in the {names[1]}")
    moved = set()
    for name in sorted(left_ids.keys() & right_ids.keys()):
        if left_ids[name] != right_ids[name]:
            moved.add(name)
            differences.append(f"{name!r} is id {left_ids[name]} in the {names[0]} but id {right_ids[name]} in the {names[1]}")
    only_left = [f"{i} {left[i]!r}" for i in sorted(left.keys() - right.keys()) if left[i] not in moved]
    only_right = [f"{i} {right[i]!r}" for i in sorted(right.keys() - left.keys()) if right[i] not in moved]
    if only_left:
        differences.append(f"only the {names[0]} has {_preview(only_left)}")
    if only_right:
        differences.append(f"only the {names[1]} has {_preview(only_right)}")
    return differences


def describe_categories(categories: Categories, limit: int = 12) -> str:
    """``1 'person', 2 'bicycle', ... (80 categories)``."""
    return _preview([f"{i} {n!r}" for i, n in sorted(_by_id(categories).items())], limit) + f" ({len(categories)} categories)"


def _by_id(categories: Categories) -> Dict[int, str]:
    return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}


def _preview(items: List[str], limit: int = 6) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
