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
