"""Exit statuses mean what the README says: 2 could not start (with the fix, folder unchanged), 1
the run started and stopped (one line and a hint, the traceback with -v)."""

import sys
import types

import pytest

from nemocc_dask.cli import main
from nemocc_dask.errors import StartError
from nemocc_dask.io import SAMPLE_PATH, gpu


def _run_args(tmp_path, *extra):
    return ["run", "--input", str(SAMPLE_PATH), "--output", str(tmp_path / "out"),
            "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress", *extra]


def test_malformed_yaml_prompt_file_exits_2_with_the_line(tmp_path, capsys):
    bad = tmp_path / "task.yaml"
    bad.write_text("name: summary\nprompt_template: 'Summarise {document}\n  - [unclosed\n")
    assert main(_run_args(tmp_path, "--prompt-file", str(bad))) == 2
    err = capsys.readouterr().err
    assert "cannot read prompt file" in err and "line" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_malformed_toml_prompt_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "task.toml"
    bad.write_text('name = "summary"\nprompt_template = "Summarise {document}\n')
    assert main(_run_args(tmp_path, "--prompt-file", str(bad))) == 2
    assert "cannot read prompt file" in capsys.readouterr().err


def test_bad_setting_exits_2(tmp_path, capsys):
    assert main(_run_args(tmp_path, "--task", "distill", "--max-failed-fraction", "0")) == 2
    assert "max_failed_fraction" in capsys.readouterr().err


def _fail_during_run(monkeypatch):
    import nemocc_dask.run.runner as runner

    def boom(*args, **kwargs):
        raise ValueError("my post-processing step found a bad row")

    monkeypatch.setattr(runner, "run_jobs", boom)
    monkeypatch.setattr("nemocc_dask.cli.make_client", lambda *a, **k: types.SimpleNamespace(
        cluster=None, close=lambda: None))


def test_error_during_the_run_exits_1_with_a_hint(tmp_path, capsys, monkeypatch):
    _fail_during_run(monkeypatch)
    assert main(_run_args(tmp_path, "--task", "distill")) == 1
    err = capsys.readouterr().err
    assert "error: the run stopped: ValueError: my post-processing step" in err
    assert "rerun with -v" in err and "Traceback" not in err


def test_error_during_the_run_with_v_shows_the_traceback(tmp_path, capsys, monkeypatch):
    _fail_during_run(monkeypatch)
    assert main(["-v", *_run_args(tmp_path, "--task", "distill")]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_gpu_check_names_a_broken_cudf_import(monkeypatch):
    monkeypatch.setattr(gpu, "_gpu_packages_installed", lambda: True)
    fake_nvml = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                                      nvmlDeviceGetCount=lambda: 1)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    monkeypatch.setitem(sys.modules, "cudf", None)  # import fails like an ABI mismatch would
    monkeypatch.delenv("NEMOCC_DASK_FORCE_CPU", raising=False)
    gpu.gpu_problem.cache_clear()
    try:
        problem = gpu.gpu_problem()
        with pytest.raises(gpu.GPUError, match="cuDF is installed but does not import"):
            gpu.require_gpu()
    finally:
        gpu.gpu_problem.cache_clear()
    assert "does not import" in problem and "no CUDA device" not in problem
    assert issubclass(gpu.GPUError, StartError)
