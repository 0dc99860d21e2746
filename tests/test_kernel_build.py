"""A build killed mid-way leaves torch's build lock file behind; the next load must not wait for it forever."""
from __future__ import annotations

import torch.utils.cpp_extension as ext

from awq.kernels import build


def test_stale_torch_build_lock_is_removed_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    srcs = [build.find_source("cluster_kernels.cpp")]
    name = f"awq_test_{build.build_key(build.source_text(srcs), ['-O1'], [])}"
    folder = build.cache_dir() / name
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what a SIGKILLed build leaves: torch's FileBaton waits while it exists
    seen = {}

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, verbose):
        seen["lock_left"] = (tmp_path / "torch_extensions" / name / "lock").exists()
        seen["dir"] = build_directory
        return "module"

    monkeypatch.setattr(ext, "load", fake_load)
    assert build.load_cpp_extension("awq_test", "cluster_kernels.cpp", ["-O1"]) == "module"
    assert seen == {"lock_left": False, "dir": str(folder)}


def test_without_a_stale_lock_nothing_is_removed(tmp_path, monkeypatch):
    """The build folder then holds only what torch writes (nothing here: load is faked) and our OS lock file."""
    monkeypatch.setenv("AWQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ext, "load", lambda **kw: kw["build_directory"])
    folder = build.load_cpp_extension("awq_test", "cluster_kernels.cpp", ["-O1"])
    assert sorted(p.name for p in (tmp_path / "torch_extensions").iterdir()) == [folder.rsplit("/", 1)[1]]
    assert sorted(p.name for p in (tmp_path / "torch_extensions" / folder.rsplit("/", 1)[1]).iterdir()) == [".build.flock"]
