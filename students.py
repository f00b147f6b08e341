"""The distillation stage's students: thin networks of the teacher's own family, freshly initialised.

- Our ResNet50 teacher: a width spec (model.py's) with the teacher's stem, classes and conv1/conv2
  widths and the base model's stage widths divided (`student_spec`), or searched for a parameter
  compression against the base (`spec_for_compression`).
- Any other functional teacher: its traced channel groups (prune.any_model_groups, residual streams
  included) narrowed by one factor searched for a parameter compression against the teacher
  (`narrowed_widths`), the graph rebuilt by prune.prune_groups and re-initialised (`narrowed_student`).

Beside model.py rather than in it: this is a policy of the distillation stage (which widths a student
gets), written entirely through model.py's spec functions and prune.py's surgery, which it shares
with no other stage.
"""

import math

import numpy as np

import model as resnet
import prune

COMPRESSION_TOLERANCE = 0.03  # how far past --student_compression a student may go (relative) before it gives up
FACTOR_GRID = np.geomspace(1e-3, 1.0, 1200)  # width factors tried (widths are whole numbers: a step function)


def check_compression(target):
    if not (math.isfinite(target) and target > 1):
        raise ValueError(f"the student compression must be a number above 1, got {target}")


def largest_within(build, count, goal):
    """(relative shortfall, candidate, factor): of the candidates `build(factor)` over FACTOR_GRID, the
    largest whose `count` is at most `goal`, so that the compression asked for is reached, never
    missed; the shortfall (goal - count) / goal is how much further than asked it goes. (inf, None,
    None) when even the thinnest candidate counts more. Widths are whole numbers, so the count is a
    step function of the factor that only grows with it: bisection finds the last grid point at or
    below the goal (what a scan of the whole grid would find)."""
    if count(build(float(FACTOR_GRID[0]))) > goal:
        return math.inf, None, None
    low, high = 0, len(FACTOR_GRID) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if count(build(float(FACTOR_GRID[middle]))) <= goal:
            low = middle
        else:
            high = middle - 1
    candidate = build(float(FACTOR_GRID[low]))
    return (goal - count(candidate)) / goal, candidate, float(FACTOR_GRID[low])


def rounded_width(width, multiple=1, cap=None):
    """`width` (a real number) as a whole width: the nearest multiple of `multiple`, at least one
    multiple, and at most `cap` rounded down to a multiple (`cap` itself where it is below one).
    `multiple` 1 is plain rounding to at least 1."""
    whole = max(multiple, multiple * int(round(width / multiple)))
    if cap is None:
        return whole
    return min(whole, cap // multiple * multiple if cap >= multiple else cap)


def fill_to_goal(widths, ideals, caps, multiple, count, goal):
    """`widths` raised by `multiple` one at a time while `count(widths)` stays at most `goal`: each
    time the width furthest below its ideal (relatively) that may still grow, so the shape stays
    the uniformly narrowed one. Rounding to a multiple above 1 steps the count coarsely: without
    this a student could land well past the compression asked for."""
    widths = list(widths)
    while True:
        for index in sorted(range(len(widths)), key=lambda i: widths[i] / ideals[i]):
            grown = widths[:index] + [widths[index] + multiple] + widths[index + 1:]
            if grown[index] <= caps[index] and count(grown) <= goal:
                widths = grown
                break
        else:
            return widths


# ---------------------------------------------------------------------------------------------
# Our ResNet50: width specs


def student_spec(teacher_spec, base_stage_widths, divisor=32, stage_widths=None):
    """The student's width spec: the teacher's stem and conv1/conv2 widths; stage widths = base // divisor.

    `stage_widths` (four ints) overrides the division.
    """
    if stage_widths is None:
        if divisor < 1:
            raise ValueError(f"the student divisor must be at least 1, got {divisor}")
        stage_widths = [max(1, int(width) // divisor) for width in base_stage_widths]
    spec = resnet.copy_spec(teacher_spec)
    spec["stages"] = [int(width) for width in stage_widths]
    return resnet.validate_spec(spec)


def spec_for_compression(teacher_spec, base_spec, stem, class_num, target, tolerance=COMPRESSION_TOLERANCE, round_to=1):
    """A student width spec with base parameters / student parameters at least `target` and within
    `tolerance` of it (a student asked for at 12.82x is never 12.7x).

    First the original's student shape: the teacher's conv1/conv2 widths, the base's stage widths
    times one factor s. When even the thinnest stages leave too many parameters, the inner widths
    shrink too (to at most the base's times s, never above the teacher's). The factor is searched
    on a fine grid (widths are whole numbers, so the count is a step function of s:
    `largest_within`); ValueError when no grid point comes close.

    `round_to` > 1 makes every width a multiple of it (`rounded_width`; the teacher's inner widths
    rounded down to one), then fills the widths back up to the target (`fill_to_goal`): oneDNN's
    kernels run whole vector blocks, and a student of odd widths trains 1.3-1.4x slower than one
    with the same parameters in multiples of 8 (docs/distillation.md).
    """
    check_compression(target)
    goal = resnet.parameter_count(base_spec, stem, class_num) / target
    teacher_blocks = [[rounded_width(width, round_to, width) for width in pair] for pair in teacher_spec["blocks"]]

    def stages_only(factor):
        spec = resnet.copy_spec(teacher_spec)
        spec["stages"] = [rounded_width(width * factor, round_to) for width in base_spec["stages"]]
        spec["blocks"] = [list(pair) for pair in teacher_blocks]
        return spec

    def inner_too(factor):
        spec = stages_only(factor)
        spec["blocks"] = [[rounded_width(b * factor, round_to, t) for t, b in zip(teacher_pair, base_pair)]
                          for teacher_pair, base_pair in zip(teacher_spec["blocks"], base_spec["blocks"])]
        return spec

    def count(spec):
        return resnet.parameter_count(spec, stem, class_num)

    def filled(spec, factor, inner):
        """`spec`'s widths filled up to the goal in steps of round_to (the stages; the inner widths too
        where the family narrows them)."""
        slots = [("stages", index) for index in range(len(spec["stages"]))]
        if inner:
            slots += [(block, conv) for block in range(len(spec["blocks"])) for conv in range(2)]

        def spec_of(widths):
            candidate = resnet.copy_spec(spec)
            for (where, index), width in zip(slots, widths):
                if where == "stages":
                    candidate["stages"][index] = width
                else:
                    candidate["blocks"][where][index] = width
            return candidate

        current = [spec["stages"][i] if where == "stages" else spec["blocks"][where][i] for where, i in slots]
        ideals = [base_spec["stages"][i] * factor if where == "stages" else base_spec["blocks"][where][i] * factor
                  for where, i in slots]
        caps = [math.inf if where == "stages" else teacher_blocks[where][i] for where, i in slots]
        return spec_of(fill_to_goal(current, ideals, caps, round_to, lambda widths: count(spec_of(widths)), goal))

    best = (math.inf, None)
    for family in (stages_only, inner_too):
        shortfall, candidate, factor = largest_within(family, count, goal)
        if candidate is not None and round_to > 1:
            candidate = filled(candidate, factor, family is inner_too)
            shortfall = (goal - count(candidate)) / goal
        if shortfall < best[0]:
            best = (shortfall, candidate)
        if best[0] <= tolerance:
            return resnet.validate_spec(best[1])
    closest = "" if best[1] is None else \
        f" (closest: {resnet.parameter_count(base_spec, stem, class_num) / resnet.parameter_count(best[1], stem, class_num):.2f}x)"
    multiples = f" with every width a multiple of {round_to}" if round_to > 1 else ""
    raise ValueError(f"no student width spec{multiples} reaches {target:g}x compression within {100 * tolerance:g}%{closest}")


def build_student(teacher, base_stage_widths, divisor=32, stage_widths=None):
    """A fresh student ResNet50 with the teacher's stem, classes, input and conv1/conv2 widths."""
    spec, stem, class_num, input_shape = resnet.describe_model(teacher)
    return resnet.build_resnet50(student_spec(spec, base_stage_widths, divisor, stage_widths), stem, class_num,
                                 input_shape, name="student")


# ---------------------------------------------------------------------------------------------
# Any functional model: its own channel groups, uniformly narrowed


def narrowed_widths(teacher, groups, target, tolerance=COMPRESSION_TOLERANCE, round_to=1):
    """({group name: width}, achieved compression): every group of `teacher` at max(1, round(width * s)),
    one factor s for all, so that teacher parameters / student parameters is at least `target` and
    within `tolerance` of it. Counted by prune.size_counter from the groups alone (no model built per candidate);
    ValueError when no factor comes close (the frozen layers, such as the classifier's classes,
    bound what narrowing can remove). `round_to` > 1: every width a multiple of it where the
    teacher's width allows, filled back up to the target, as `spec_for_compression` does."""
    check_compression(target)
    if not groups:
        raise ValueError(f"{teacher.name} has no channel group to narrow")
    count = prune.size_counter(teacher, groups)
    teacher_parameters = count({})[0]
    goal = teacher_parameters / target
    names = [group["name"] for group in groups]

    def widths(factor):
        return {group["name"]: rounded_width(group["width"] * factor, round_to, group["width"]) for group in groups}

    shortfall, best, factor = largest_within(widths, lambda candidate: count(candidate)[0], goal)
    if best is not None and round_to > 1:
        filled = fill_to_goal([best[name] for name in names], [group["width"] * factor for group in groups],
                              [rounded_width(group["width"], round_to, group["width"]) for group in groups], round_to,
                              lambda candidate: count(dict(zip(names, candidate)))[0], goal)
        best = dict(zip(names, filled))
        shortfall = (goal - count(best)[0]) / goal
    if shortfall > tolerance:
        closest = "" if best is None else f"; the closest at or above it is {teacher_parameters / count(best)[0]:.2f}x"
        multiples = f" with every width a multiple of {round_to}" if round_to > 1 else ""
        raise ValueError(f"narrowing {teacher.name}'s channel groups{multiples} reaches no compression within "
                         f"{100 * tolerance:g}% above {target:g}x{closest}")
    return best, teacher_parameters / count(best)[0]


def _initializers(network):
    """[(variable, initializer)] for every weight of `network`'s layers that have trainable weights,
    from each layer's own `<weight>_initializer` attribute (a depthwise kernel's: depthwise_initializer);
    None when some weight has none (a custom layer)."""
    import keras

    pairs = []
    for layer in network.layers:
        if isinstance(layer, keras.Model):
            inner = _initializers(layer)
            if inner is None:
                return None
            pairs += inner
            continue
        if not layer.trainable_weights:  # a Normalization's statistics describe the input: kept
            continue
        for weight in layer.weights:
            name = weight.name
            candidates = [f"{name}_initializer", f"{name.replace('_kernel', '')}_initializer"]
            candidates += ["depthwise_initializer"] if name == "kernel" else []  # DepthwiseConv2D's kernel
            initializer = next((getattr(layer, key) for key in candidates if callable(getattr(layer, key, None))), None)
            if initializer is None:
                return None
            pairs.append((weight, initializer))
    return pairs


def reinitialised(network, name=None):
    """`network` with fresh weights: each weight re-drawn in place from its layer's initializer
    (the model was just built by the caller, or is re-initialised by request). Layers without
    trainable weights keep their state (a Normalization's statistics describe the input, not
    learnt features). A model with a weight of no known initializer is instead copied with every
    layer rebuilt from its config (a weightless layer whose config cannot be rebuilt, such as a
    Lambda of a Python lambda refused by safe-mode deserialization, is reused)."""
    import keras

    pairs = _initializers(network)
    if pairs is not None:
        for weight, initializer in pairs:
            weight.assign(initializer(tuple(weight.shape), weight.dtype))
        copy = network
    else:
        def clone(layer):
            try:
                return layer.__class__.from_config(layer.get_config())
            except ValueError:
                if getattr(layer, "weights", None):
                    raise
                return layer

        def fresh_input(tensor):  # clone_model would name the input layer after its tensor ('keras_tensor')
            return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor._keras_history.operation.name)

        copy = keras.models.clone_model(network, input_tensors=keras.tree.map_structure(fresh_input, network.input),
                                        clone_function=clone)
        for original, fresh in zip(network.layers, copy.layers):
            if original.weights and not original.trainable_weights and fresh is not original:
                fresh.set_weights(original.get_weights())
    if name is None or name == copy.name:
        return copy
    return keras.Model(copy.input, copy.output, name=name)


def narrowed_student(teacher, target, tolerance=COMPRESSION_TOLERANCE, round_to=1):
    """(student, {group name: width}, achieved compression): `teacher`'s own graph with every channel
    group narrowed (`narrowed_widths`, residual streams included), freshly initialised."""
    groups = prune.any_model_groups(teacher, residual=True)
    widths, achieved = narrowed_widths(teacher, groups, target, tolerance, round_to)
    keep = {name: np.arange(width) for name, width in widths.items()}
    return reinitialised(prune.prune_groups(teacher, groups, keep), name="student"), widths, achieved
