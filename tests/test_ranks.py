import subprocess
import sys

from helpers import REPO
from gigatrain import ranks


def test_without_a_process_group_torchruns_environment_decides(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (ranks.global_rank(), ranks.world_size(), ranks.is_main_process()) == (0, 1, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (ranks.global_rank(), ranks.world_size(), ranks.is_main_process()) == (3, 4, False)


def test_asking_imports_no_torch():
    """The CLI asks which worker reports an error before anything else loads."""
    code = "import sys, gigatrain.ranks as r; r.is_main_process(); r.world_size(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.strip() == "False"
