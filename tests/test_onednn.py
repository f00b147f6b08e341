"""oneDNN is on wherever our code loads TensorFlow, unless the user says otherwise."""

import os
import subprocess
import sys

from conftest import REPO

PROBE = ("import os, {module}, tensorflow; from cnn_compression import onednn; "
         "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), onednn.enabled())")


def probe(module, setting):
    environment = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        environment["TF_ENABLE_ONEDNN_OPTS"] = setting
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=REPO, env=environment,
                            capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_scripts_and_library_turn_onednn_on_before_tensorflow_loads():
    # cli: every script's first import; model: a library user's. Both must come before TensorFlow.
    # The variable as well as the result: CPUs with AMX or AVX512-VNNI have oneDNN on without it.
    assert probe("cnn_compression.cli", None) == "1 True"
    assert probe("model", None) == "1 True"


def test_the_users_setting_stands():
    assert probe("cnn_compression.cli", "0") == "0 False"


def test_cpu_facts_come_from_the_first_processor_of_cpuinfo(tmp_path, monkeypatch):
    from cnn_compression import cpu

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu avx2 fma amx_bf16\n")
    monkeypatch.setattr(cpu, "CPUINFO", str(fake))
    assert (cpu.model_name(), cpu.flags(), cpu.native_bfloat16()) == ("AMD EPYC 7B13", {"fpu", "avx2", "fma"}, False)
    fake.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 avx512_bf16 amx_bf16\n")
    assert cpu.native_bfloat16() and cpu.model_name() == "Intel(R) Xeon(R) Processor"
    # oneDNN held to AVX2 runs an AVX2 CPU's kernels: no native bfloat16, and the figures say so.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not cpu.native_bfloat16() and cpu.model_name() == "Intel(R) Xeon(R) Processor, oneDNN capped at AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu.native_bfloat16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    assert cpu.native_bfloat16() and cpu.model_name() == "Intel(R) Xeon(R) Processor"
    monkeypatch.setattr(cpu, "CPUINFO", str(tmp_path / "missing"))
    assert cpu.flags() == set() and not cpu.native_bfloat16() and cpu.model_name()  # platform's answer instead


def test_onednn_computes_on_the_cpu_only_without_a_gpu(monkeypatch):
    """The workarounds for oneDNN's CPU kernels (fused_batch_norm, strided_pointwise) key on this:
    with a GPU visible, cuDNN takes the convolutions and BatchNorms and they must stay Keras' own."""
    import tensorflow as tf

    from cnn_compression import onednn

    assert onednn.computes_on_cpu()  # conftest's process: oneDNN on, no GPU
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert not onednn.computes_on_cpu()
    monkeypatch.undo()
    monkeypatch.setattr(onednn, "enabled", lambda: False)
    assert not onednn.computes_on_cpu()
