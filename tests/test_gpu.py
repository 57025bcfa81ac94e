"""The GPU switch: clear, early errors without a GPU, and the same results on cuDF partitions
where one is present (those tests are skipped, with the reason, on machines without a GPU)."""

import pandas as pd
import pyarrow as pa
import pytest

from nemocc_dask import LLMConfig
from nemocc_dask.cli import main
from nemocc_dask.io import SAMPLE_PATH, read_input
from nemocc_dask.io.frames import _arrow_type, series_like
from nemocc_dask.io.gpu import GPUError, gpu_available, require_gpu, to_gpu
from nemocc_dask.run.runner import run_to_parquet
from nemocc_dask.testing.mock import MockLLMServer

no_gpu = pytest.mark.skipif(gpu_available(), reason="this machine has a usable GPU")
needs_gpu = pytest.mark.skipif(not gpu_available(),
                               reason="cuDF with a CUDA device is not available on this machine")


@no_gpu
def test_require_gpu_says_what_is_missing():
    with pytest.raises(GPUError, match=r"nemocc_dask\[gpu\]|CUDA device"):
        require_gpu()


@no_gpu
def test_to_gpu_refuses_without_gpu():
    with pytest.raises(GPUError):
        to_gpu(read_input(str(SAMPLE_PATH), 100))


@no_gpu
def test_run_with_gpu_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    llm = LLMConfig(base_url="http://127.0.0.1:9/v1", model="m")  # never contacted
    with pytest.raises(GPUError):
        run_to_parquet(str(SAMPLE_PATH), out, "distill", llm, gpu=True, show_progress=False)
    assert not out.exists()


@no_gpu
@pytest.mark.parametrize("command", [["run", "--task", "distill"], ["nemotron-cc"]])
def test_cli_gpu_flag_without_gpu_exits_2(tmp_path, capsys, command):
    out = tmp_path / "out"
    code = main([*command, "--gpu", "--input", str(SAMPLE_PATH), "--output", str(out),
                 "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress"])
    assert code == 2
    assert "GPU" in capsys.readouterr().err
    assert not out.exists()


@no_gpu
def test_gpu_from_dask_config_without_gpu_exits_2(tmp_path, capsys):
    import dask

    with dask.config.set({"nemocc.gpu": True}):
        code = main(["run", "--task", "distill", "--input", str(SAMPLE_PATH), "--output",
                     str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert code == 2 and "GPU" in capsys.readouterr().err


@no_gpu
def test_demo_gpu_without_gpu_exits_2(tmp_path, capsys):
    assert main(["demo", "--gpu", "--output", str(tmp_path / "demo"), "--no-progress"]) == 2
    assert "GPU" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, arrow", [("int64", pa.int64()), (bool, pa.bool_()),
                                          ("Int64", pa.int64()), (object, pa.string()),
                                          (pd.StringDtype(), pa.string())])
def test_arrow_type_of_column_dtypes(dtype, arrow):
    assert _arrow_type(dtype) == arrow


def test_series_like_keeps_index_and_dtype():
    like = pd.DataFrame({"a": [1, 2, 3]}, index=[7, 8, 9])
    s = series_like(["x", None, "z"], like)
    assert list(s.index) == [7, 8, 9] and s.isna().tolist() == [False, True, False]


@pytest.mark.slow
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("task", ["diverse_qa", "wikipedia_paraphrasing"])
def test_gpu_run_matches_cpu_run(tmp_path, cluster_client, task):
    """Same input, same answers: cuDF partitions write the same rows as pandas partitions."""
    outputs = {}
    with MockLLMServer(latency=0.005) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=32)
        for gpu in (False, True):
            out = tmp_path / f"gpu-{gpu}"
            report = run_to_parquet(str(SAMPLE_PATH), out, task, llm, rows_per_partition=50,
                                    show_progress=False, gpu=gpu)
            assert report["accounted"]
            outputs[gpu] = pd.concat([pd.read_parquet(f) for f in sorted((out / "parts").glob("*"))],
                                     ignore_index=True)
    cpu, gpu = (outputs[k].sort_values(["id", "segment_id"]).reset_index(drop=True)
                for k in (False, True))
    pd.testing.assert_frame_equal(cpu, gpu, check_dtype=False)
