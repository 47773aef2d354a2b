import pytest

import sisyphus.global_settings as gs


@pytest.fixture
def setup_dir(tmp_path, monkeypatch):
    """A setup folder for Jobs built in the test process: gs.BASE_DIR at tmp_path, work/ below it."""
    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(gs, "WORK_DIR", "work")
    return tmp_path
