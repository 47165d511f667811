"""Run test scenarios on several gloo ranks (127.0.0.1 only) and read back what each rank saw.

The pytest side (:func:`reports`) starts ``world`` copies of a test file as scripts; each copy
calls :func:`run_scenarios` with its rank, which runs every scenario in order, writes per rank
which ones failed and why (JSON), and exits. A scenario that fails stops the later ones on that
rank, and the rank leaves with ``os._exit(1)`` so that its peer's pending collective fails at
once instead of waiting for the timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta
from typing import Callable

import pytest

try:
    import torch.distributed as dist

    HAVE_GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:  # pragma: no cover - torch without distributed support
    HAVE_GLOO = False


def run_scenarios(scenarios: dict[str, Callable[..., None]], rank: int, world: int, port: int, outdir: str,
                  with_dir: frozenset = frozenset()) -> None:
    """Worker side: one process group, every scenario in order (those named in ``with_dir`` get
    ``outdir``, a folder the ranks share, as their second argument), a report per rank there."""
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    report: dict[str, str | None] = {}
    failed = None
    for name, fn in scenarios.items():
        if failed is not None:
            report[name] = f"not run: scenario {failed} failed before"
            continue
        try:
            fn(rank, outdir) if name in with_dir else fn(rank)
            dist.barrier()  # a rank that failed has left: this raises instead of pairing the next collectives
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc()
            failed = name
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if failed is not None:
        os._exit(1)  # the peer's pending collective fails at once
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reports(script: str, world: int, timeout_s: float) -> list[dict[str, str | None]]:
    """pytest side: run ``script`` on ``world`` ranks (``script rank world port outdir``) and
    return each rank's report; fails the test, with the rank's output, if one wrote none."""
    if not HAVE_GLOO:
        pytest.skip("torch.distributed with gloo is not available")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        logs = [open(os.path.join(outdir, f"log{r}.txt"), "w+") for r in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(script), str(r), str(world), str(port), outdir],
                env=env,
                cwd=root,
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        try:
            for p in procs:
                p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        out = []
        for r in range(world):
            logs[r].seek(0)
            log = logs[r].read()[-4000:]
            logs[r].close()
            path = os.path.join(outdir, f"rank{r}.json")
            if not os.path.exists(path):
                pytest.fail(f"rank {r} wrote no report (exit code {procs[r].returncode}); its output:\n{log}")
            with open(path) as f:
                out.append(json.load(f))
        return out


def scenario_tests(script: str, scenarios: dict, world: int, timeout_s: float):
    """The pytest side of a scenario file: a module-scoped fixture ``reports`` (one spawn of
    ``world`` ranks running ``script``) and a test parametrized over the scenarios' names; bind
    both at module level (``reports, test_x = ranks.scenario_tests(__file__, SCENARIOS, ...)``)."""

    @pytest.fixture(scope="module", name="reports")
    def reports_fixture():
        return reports(script, world, timeout_s)

    @pytest.mark.parametrize("scenario", list(scenarios))
    def test_scenario(reports, scenario):
        assert_scenario_passed(reports, scenario)

    return reports_fixture, test_scenario


def assert_scenario_passed(reports: list[dict[str, str | None]], scenario: str) -> None:
    failures = {rank: report.get(scenario, "no report") for rank, report in enumerate(reports)}
    failures = {rank: why for rank, why in failures.items() if why is not None}
    assert not failures, "\n".join(f"rank {rank}, {scenario}:\n{why}" for rank, why in failures.items())
