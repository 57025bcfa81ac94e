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


@pytest.mark.parametrize("option, value", [("--workers", "0"), ("--threads-per-worker", "0"),
                                           ("--rows-per-partition", "0"),
                                           ("--wait-for-lock", "-1"), ("--workers", "two")])
def test_a_count_that_cannot_work_is_a_usage_error(tmp_path, capsys, option, value):
    """``--workers 0`` started a cluster that never ran anything: the run waited forever."""
    with pytest.raises(SystemExit) as exited:
        main(_run_args(tmp_path, "--task", "distill", option, value))
    assert exited.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_a_local_cluster_without_workers_is_refused_from_python():
    from nemocc_dask.run.cluster import ClusterError, make_client

    with pytest.raises(ClusterError, match="at least 1 worker"):
        make_client("local", workers=0)


@pytest.mark.parametrize("output", ["a-file", "a-file/out"])
def test_an_output_folder_that_cannot_be_one_exits_2_naming_it(tmp_path, capsys, output):
    """A file where the output folder should be stopped the run with NotADirectoryError (exit 1
    and a hint to rerun); it is refused among the start checks."""
    (tmp_path / "a-file").write_text("notes\n")
    args = _run_args(tmp_path, "--task", "distill", "--workers", "1")
    args[args.index("--output") + 1] = str(tmp_path / output)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "a-file" in err and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "notes\n"
