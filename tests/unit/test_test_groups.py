"""`make test` runs the suite on two xdist workers with `--dist loadgroup` and counts on it: every Ray
test in one group, so no two local Rays start at once on two cores (tests/conftest.py). xdist 3.8
under pytest 9 accepts the option and silently schedules every test alone; this test fails then."""
import os
import subprocess
import sys
import textwrap


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """Six tests in group "g" and six ungrouped, each writing its worker's name: the six of "g" all
    ran on one worker (spread one at a time over two workers, they would land on both)."""
    (tmp_path / "test_g.py").write_text(textwrap.dedent("""
        import os, pytest
        @pytest.mark.parametrize("i", range(6))
        @pytest.mark.xdist_group("g")
        def test_grouped(i):
            with open(os.environ["GROUP_LOG"], "a") as f:
                f.write(f"g {os.environ['PYTEST_XDIST_WORKER']}\\n")

        @pytest.mark.parametrize("i", range(6))
        def test_free(i):
            pass
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["GROUP_LOG"] = str(tmp_path / "workers")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", "-p", "no:randomly", "test_g.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = (tmp_path / "workers").read_text().split()[1::2]
    assert len(workers) == 6
    assert len(set(workers)) == 1, f"group 'g' ran on {sorted(set(workers))}: xdist's loadgroup does not group"


def test_the_suites_own_hook_puts_every_ray_test_on_one_worker(tmp_path):
    """The marks tests/conftest.py adds must reach xdist: its hook on each worker reads `xdist_group`
    at collection, so a mark added by a later hook is ignored and the Ray tests run on both workers at
    once (seen: the conftest hook was `trylast`). Six tests marked `ray` in two files, beside six
    others, collected through the suite's own `pytest_collection_modifyitems`: the six ran on one
    worker."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {root!r})
        from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (the hook under test)

        def pytest_configure(config):
            config.addinivalue_line("markers", "ray: starts or attaches to a Ray")
    """))
    body = textwrap.dedent("""
        import os, pytest
        @pytest.mark.ray
        @pytest.mark.parametrize("i", range(3))
        def test_ray(i):
            with open(os.environ["GROUP_LOG"], "a") as f:
                f.write(f"g {os.environ['PYTEST_XDIST_WORKER']}\\n")

        @pytest.mark.parametrize("i", range(3))
        def test_free(i):
            pass
    """)
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).write_text(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["GROUP_LOG"] = str(tmp_path / "workers")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                           "--no-loadscope-reorder", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "test_a.py", "test_b.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = (tmp_path / "workers").read_text().split()[1::2]
    assert len(workers) == 6
    assert len(set(workers)) == 1, f"the ray tests ran on {sorted(set(workers))}: the conftest's marks came too late"
