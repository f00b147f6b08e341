"""What /proc/cpuinfo says about this CPU, without loading TensorFlow (a benchmark's parent process
reads it before deciding which variants its children measure)."""

import os
import platform

# Flags of CPUs that compute bfloat16 natively (AMX tiles or AVX512 bf16 dot products).
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below its bfloat16 kernels: under them it emulates bfloat16.
ISAS_WITHOUT_BFLOAT16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")

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


def isa_cap():
    """The instruction set oneDNN is held to (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA),
    upper-cased; None when it may use all this CPU has. Capping it at AVX2 on a newer CPU runs the
    kernels an AVX2 CPU gets, which is how speed on AVX2 machines can be measured elsewhere."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return None if cap in ("", "ALL") else cap


def model_name():
    """The CPU's model name, and oneDNN's ISA cap when one is set (speed figures are only meaningful
    beside it)."""
    name = _first_field("model name") or platform.processor() or platform.machine()
    return name if isa_cap() is None else f"{name}, oneDNN capped at {isa_cap()}"


def flags():
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return set((_first_field("flags") or "").split())


def native_bfloat16():
    """Whether this CPU computes bfloat16 natively (and oneDNN is not held below its bfloat16 kernels)."""
    return bool(flags() & set(BFLOAT16_FLAGS)) and isa_cap() not in ISAS_WITHOUT_BFLOAT16
