import pytest

from fault_runs import train_2proc


@pytest.fixture(scope="session")
def reference(tmp_path_factory, byte_data):
    """One uninterrupted two-process run of fault_runs.BASE, shared by every test that compares
    a run with failures (in any recovery mode: the math is the same) against it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train_2proc(byte_data, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
