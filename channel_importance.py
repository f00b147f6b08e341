"""Per-channel importance of traced channel groups: one interface for every criterion.

    scores = IMPORTANCES[criterion](network, groups, images)   # {group name: array (width,)}

Every criterion is a pure function of (network, groups, images=None): it reads weights or runs
the model, never selects nor slices. Higher means more important (Torch-Pruning's convention);
prune.select_channels keeps the LOWEST scores, so select on `-scores`:

    keep = {name: prune.select_channels(-score, "fraction", fraction=0.25, name=name)
            for name, score in scores.items()}

Frozen groups get no score. A new criterion (bn_scale, taylor, random, ...) is a function with
the same signature added to IMPORTANCES.
"""

import numpy as np

import prune

KERNELS = ("kernel", "pointwise_kernel")  # the weight holding a producer's filters


def l1_norm(network, groups, images=None):
    """{group: per-channel L1 norm of its filters}, summed over the group's producers.

    A filter is everything the producer's kernel holds for one output channel (all positions and
    input channels); a channel tied through an Add has one filter in each branch: they add up.
    `images` is not used.
    """
    layers = {layer.name: layer for layer in network.layers}
    scores = {}
    for group in groups:
        if group["frozen"]:
            continue
        total = np.zeros(group["width"], np.float64)
        for entry in group["producers"]:
            layer = layers[entry["layer"]]
            for weight, value in zip(layer.weights, layer.get_weights()):
                if weight.name not in KERNELS or weight.name not in entry["weights"]:
                    continue
                axis = entry["weights"][weight.name] % value.ndim
                per_position = np.abs(value.astype(np.float64)).sum(axis=tuple(a for a in range(value.ndim) if a != axis))
                total += per_position[entry["indices"]].sum(axis=1)
        scores[group["name"]] = total
    return scores


def apoz(network, groups, images, batch_size=128):
    """{group: minus the mean APoZ of its channels}, for groups with a ReLU-family output.

    APoZ (Hu et al. 2016) is measured by prune.apoz in one streaming pass over `images` at every
    activation the groups list, and averaged over them (a channel read at several positions, as
    after a Concatenate, averages those too). Negated so that higher is more important; minus is
    exact in floating point, so select_channels(-score) selects exactly as select_channels(APoZ).
    """
    measured = [group for group in groups if not group["frozen"] and group["activations"]]
    names = sorted({entry["layer"] for group in measured for entry in group["activations"]})
    if not names:
        return {}
    layer_apoz = prune.apoz(network, names, images, batch_size=batch_size, verbose=0)
    scores = {}
    for group in measured:
        per_entry = [layer_apoz[entry["layer"]][entry["indices"]].mean(axis=1) for entry in group["activations"]]
        scores[group["name"]] = -np.mean(per_entry, axis=0)
    return scores


IMPORTANCES = {"l1": l1_norm, "apoz": apoz}


def importance(criterion, network, groups, images=None, **options):
    """IMPORTANCES[criterion](network, groups, images, **options), with a clear error for a typo."""
    if criterion not in IMPORTANCES:
        raise ValueError(f"unknown importance {criterion!r}; choose one of {', '.join(sorted(IMPORTANCES))}")
    return IMPORTANCES[criterion](network, groups, images, **options)
