"""Backend discovery, selection and the native extension's build/load contract."""

from __future__ import annotations

import json

import pytest
import torch

from dino_fast.ops import backends, native

CPU = torch.device("cpu")


def test_available_backends_maps_every_backend_to_none_or_a_reason() -> None:
    available = backends.available_backends("cpu")
    assert set(available) == {"triton", "native", "torch"}
    assert available["torch"] is None
    for reason in available.values():
        assert reason is None or (isinstance(reason, str) and reason)


def test_triton_runs_on_cpu_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.available_backends("cpu")["triton"] is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.available_backends("cpu")["triton"]
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_default_choice_on_cpu_prefers_native_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "native_unavailable_reason", lambda device_type, native_op=None: None)
    assert backends.select_backend(None, CPU, op="dino_loss", native_op="x") == "native"
    monkeypatch.setattr(
        backends, "native_unavailable_reason", lambda device_type, native_op=None: "not built"
    )
    assert backends.select_backend(None, CPU, op="dino_loss", native_op="x") == "torch"


def test_default_choice_on_cuda_prefers_triton_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device_type: None)
    assert backends.select_backend(None, cuda, op="ema_update_", native_op="x") == "triton"
    monkeypatch.setattr(backends, "triton_unavailable_reason", lambda device_type: "no triton")
    assert backends.select_backend(None, cuda, op="ema_update_", native_op="x") == "torch"


def test_environment_variable_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select_backend(None, CPU, op="dino_loss", native_op="x") == "torch"


def test_forcing_an_unavailable_backend_says_why_and_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "load", lambda: (None, "dino_fast._C is not built; rebuild it with pip"))
    with pytest.raises(backends.BackendUnavailableError, match=r"dino_loss: backend 'native'.*rebuild it"):
        backends.select_backend("native", CPU, op="dino_loss", native_op="x")
    monkeypatch.setenv(backends.ENV_VAR, "native")
    with pytest.raises(backends.BackendUnavailableError, match="not built"):
        backends.select_backend(None, CPU, op="dino_loss", native_op="x")


def test_unknown_backend_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="triton, native, torch"):
        backends.select_backend("cudnn", CPU, op="dino_loss", native_op="x")


def test_native_without_a_kernel_for_the_op_is_unavailable() -> None:
    if native.load()[0] is None:
        pytest.skip("native extension not built in this environment")
    reason = backends.unavailable_reason("native", "cpu", native_op="no_such_op")
    assert reason is not None and "no_such_op" in reason


def test_extension_built_for_another_torch_is_refused_with_one_warning(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "_C_build.json"
    manifest.write_text(json.dumps({"torch_version": "1.0.0+old", "cuda": False}))
    monkeypatch.setattr(native, "_MANIFEST", manifest)
    with pytest.warns(RuntimeWarning, match=r"built against torch 1\.0\.0\+old"):
        module, reason = native.load.__wrapped__()
    assert module is None
    assert "1.0.0+old" in reason and torch.__version__ in reason and "pip install" in reason


def test_missing_extension_is_reported_not_raised(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_MANIFEST", tmp_path / "absent.json")
    module, reason = native.load.__wrapped__()
    assert module is None and "DINO_FAST_NO_EXT=1" in reason


def test_build_info_describes_the_build() -> None:
    module, reason = native.load()
    if module is None:
        pytest.skip(f"native extension unavailable: {reason}")
    info = module.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert bool(info["cuda_archs"]) == info["cuda"]
