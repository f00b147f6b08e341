"""Which channels to keep: selection rules over per-channel importances (higher = keep).

    keep = {name: select_channels(scores[name], "fraction", fraction=0.2)}   # each group on its own
    keep = select_global(scores, "fraction", fraction=0.2, floors=...)       # across groups
    keep, predicted, cut = select_to_target(scores, keep, predict, 3.0)      # cut down to just reach a target

Every rule removes the least important channels. The scores come from channel_importance.py, the
groups from channel_graph.py; prune.py slices the weights. `stable_keys` and `floors` name and
bound groups across iterations of a pruning run.
"""

import math
import re

import numpy as np

CRITERIA = ("std", "fraction")
RANKINGS = ("layer", "global")
# Global ranking never takes a group below this share of its width in the base model (nor below
# --min_channels): one layer whose scores happen to be low must not be pruned to nothing.
GLOBAL_MIN_SHARE = 0.1


class EmptyLayerError(ValueError):
    """A selection rule would remove every channel of a layer."""


def most_important(scores, kept):
    """Sorted indices of the `kept` most important channels (ties: the lower index is kept)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:kept])


def _round_up(kept, round_to, width):
    return min(width, -(-kept // round_to) * round_to)


def select_channels(scores, criterion="std", std_k=1.0, fraction=None, min_channels=1, round_to=1, name="layer"):
    """Sorted indices of the channels to KEEP, given one group's per-channel importance.

    std:      remove the channels whose importance is below mean - std_k * std of the group (for
              1 - APoZ: APoZ above mean + std_k * std, the original's rule).
    fraction: remove the round(fraction * width) least important channels.
    Then keep at least `min_channels` (0: no floor), round the kept count up to a multiple of
    `round_to` (never above the width), and keep the most important channels (ties: lower index).
    """
    scores = np.asarray(scores, dtype=np.float64)
    width = len(scores)
    if width == 0:
        raise ValueError(f"{name} has no channels")
    if criterion == "std":
        if std_k < 0:
            raise ValueError(f"std_k must be non-negative, got {std_k}")
        removed = int(np.sum(scores < scores.mean() - std_k * scores.std()))
    elif criterion == "fraction":
        if fraction is None or not 0 < fraction < 1:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
        removed = int(math.floor(fraction * width + 0.5))
    else:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if min_channels < 0 or round_to < 1:
        raise ValueError("min_channels must be >= 0 and round_to >= 1")
    kept = _round_up(max(width - removed, min(min_channels, width)), round_to, width)
    if kept == 0:
        raise EmptyLayerError(f"pruning would remove all {width} channels of {name}; raise --min_channels or lower --prune_fraction")
    return most_important(scores, kept)


def normalised_scores(scores):
    """{group name: importances divided by the group's mean}, so that channels of different layers
    compare: 1 is an average channel of its layer. (The mean rather than the max: one outlier
    channel would set a whole layer's scale.) A group scoring all zero stays zero."""
    result = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean() if len(values) else 0.0
        result[name] = values / mean if mean > 0 else values
    return result


def global_floor(base_width, min_channels=1, min_share=GLOBAL_MIN_SHARE):
    """Fewest channels global ranking leaves a group whose base-model width is `base_width`:
    --min_channels, and never below `min_share` of that width (at least one channel)."""
    return max(1, min_channels, int(math.ceil(min_share * base_width)))


def select_global(scores, criterion="fraction", std_k=1.0, fraction=None, floors=None, round_to=1):
    """{group name: sorted indices to KEEP}, channels compared across groups by `normalised_scores`.

    fraction: remove the round(fraction * all channels) globally least important channels;
    std:      remove the channels whose normalised score is below mean - std_k * std of all channels.
    A channel whose group is at its floor (`floors`: {group name: fewest channels kept}, default 1)
    is passed over and the next least important one goes instead, so the count holds while some
    group can still give. Kept counts are then rounded up to a multiple of `round_to`.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if round_to < 1:
        raise ValueError("round_to must be >= 1")
    names = list(scores)
    normalised = normalised_scores(scores)
    pooled = np.concatenate([normalised[name] for name in names]) if names else np.zeros(0)
    if criterion == "std":
        if std_k < 0:
            raise ValueError(f"std_k must be non-negative, got {std_k}")
        removed = int(np.sum(pooled < pooled.mean() - std_k * pooled.std())) if len(pooled) else 0
    else:
        if fraction is None or not 0 < fraction < 1:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
        removed = int(math.floor(fraction * len(pooled) + 0.5))
    widths = {name: len(scores[name]) for name in names}
    kept = dict(widths)
    floor = {name: min(widths[name], max(1, (floors or {}).get(name, 1))) for name in names}
    group_of = np.concatenate([np.full(widths[name], position) for position, name in enumerate(names)]) if names else np.zeros(0, int)
    # least important first; ties: earlier group, then lower index
    for entry in np.lexsort((np.arange(len(pooled)), group_of, pooled)):
        if removed == 0:
            break
        name = names[group_of[entry]]
        if kept[name] > floor[name]:
            kept[name] -= 1
            removed -= 1
    return {name: most_important(scores[name], _round_up(kept[name], round_to, widths[name])) for name in names}


def removal_order(scores, keep, ranking="layer"):
    """The channels a selection `keep` removes, one group name per channel, in the order a
    smaller step would remove them.

    layer:  proportionally: the j-th least important of the r channels a group loses comes at
            (j + 0.5) / r, so the first n entries are the selection scaled down by one global
            fraction, to the channel (ties: earlier group);
    global: by normalised score, least important first.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    normalised = normalised_scores(scores) if ranking == "global" else None
    entries = []
    for position, (name, kept) in enumerate(keep.items()):
        removed = removed_channels(len(scores[name]), kept)
        if ranking == "layer":
            priorities = (np.arange(len(removed)) + 0.5) / max(1, len(removed))
        else:
            priorities = np.sort(normalised[name][removed])
        entries += [(float(priority), position, name) for priority in priorities]
    entries.sort()
    return [name for _, _, name in entries]


def select_to_target(scores, keep, predict, target, ranking="layer", round_to=1):
    """(keep, predicted ratio, cut): the selection `keep`, cut down so that it just reaches `target`.

    `predict`: {group name: width} -> ratio (e.g. from prune.size_counter). If the whole selection stays
    below the target it is returned unchanged (cut False). Otherwise the fewest of its removals, in
    `removal_order`, that reach the target are found by bisection (the ratio only grows with each
    channel removed); the result overshoots the target by at most one channel's share (more with
    `round_to` > 1, whose rounding is kept).
    """
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    widths = {name: len(scores[name]) for name in keep}
    order = removal_order(scores, keep, ranking)

    def kept_widths(count):
        removed = dict.fromkeys(widths, 0)
        for name in order[:count]:
            removed[name] += 1
        return {name: _round_up(widths[name] - removed[name], round_to, widths[name]) for name in widths}

    full = predict(kept_widths(len(order)))
    if full < target:
        return keep, full, False
    low, high = 0, len(order)  # predict(kept_widths(high)) >= target throughout
    while low < high:
        middle = (low + high) // 2
        if predict(kept_widths(middle)) >= target:
            high = middle
        else:
            low = middle + 1
    chosen = kept_widths(low)
    return {name: most_important(scores[name], chosen[name]) for name in keep}, predict(chosen), low < len(order)


def removed_channels(width, kept):
    """Indices in 0..width-1 that are not in `kept`."""
    return np.setdiff1d(np.arange(width), kept)


SPLIT_GROUP = re.compile(r"^(?P<layer>.*)\[(?P<start>\d+):\d+\](?P<repeat>#\d+)?$")  # channel_graph's layer[start:stop]


def stable_keys(groups):
    """{group name: a key that names the same group in the base model and after any pruning}.

    A group that splits a layer's channels is named by its positions, layer[start:stop], which
    shift when channels before it go; its rank among that layer's split groups does not (pruning
    keeps every group, with at least one channel). Other names stay as they are."""
    ranks = {}
    for group in groups:
        match = SPLIT_GROUP.match(group["name"])
        if match:
            ranks.setdefault((match["layer"], match["repeat"] or ""), []).append((int(match["start"]), group["name"]))
    keys = {group["name"]: group["name"] for group in groups}
    for (layer, repeat), members in ranks.items():
        for rank, (_, name) in enumerate(sorted(members)):
            keys[name] = f"{layer}[split {rank}]{repeat}"
    return keys


def group_floors(groups, base_widths=None, ranking="layer", min_channels=1, round_to=1):
    """{group name: fewest channels a selection may leave}, never above the current width.
    `base_widths`: {stable key (see `stable_keys`): width} in the base model, since global
    ranking's floor is a share of the base width; the layer ranking's is --min_channels."""
    keys = stable_keys(groups)
    result = {}
    for group in groups:
        width = group["width"]
        if ranking == "global":
            floor = global_floor((base_widths or {}).get(keys[group["name"]], width), min_channels)
        else:
            floor = max(1, min_channels)
        result[group["name"]] = min(width, -(-floor // round_to) * round_to)
    return result
