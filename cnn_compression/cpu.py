"""What /proc/cpuinfo says about this CPU, without loading TensorFlow (a benchmark's parent process
reads it before deciding which variants its children measure)."""

import platform

# Flags of CPUs that compute bfloat16 natively (AMX tiles or AVX512 bf16 dot products).
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")

CPUINFO = "/proc/cpuinfo"


def _first_field(name):
    """The value of the first `name : value` line of /proc/cpuinfo (the first processor's), or None."""
    try:
        with open(CPUINFO) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def model_name():
    """The CPU's model name (speed figures are only meaningful beside it)."""
    return _first_field("model name") or platform.processor() or platform.machine()


def flags():
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return set((_first_field("flags") or "").split())


def native_bfloat16():
    """Whether this CPU computes bfloat16 natively."""
    return bool(flags() & set(BFLOAT16_FLAGS))
