"""bench/throughput.py's alternating windows: a ratio of two workloads survives a load that comes and
goes, where timing one workload after the other does not."""
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench/throughput.py")
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc"),
                                reason="pins to one CPU and reads /proc")


def spin(n: int) -> int:
    """A fixed amount of CPU work: spin(2n) costs twice spin(n)."""
    x = 0
    for i in range(n):
        x += i
    return x


class Hogs:
    """CPU hogs started paused (they wait on stdin); `on()` sets them spinning. Started from a thread
    pinned to one CPU, they inherit the pin, so they take that CPU from the workloads on any machine."""

    def __init__(self, k: int):
        code = "import sys\nsys.stdin.buffer.read(1)\nwhile 1: pass"
        self.procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE) for _ in range(k)]

    def on(self):
        for p in self.procs:
            p.stdin.write(b"x")
            p.stdin.flush()

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()


def sequential(arms: dict, windows: int) -> dict:
    """The old way: all of one workload's windows, then all of the next one's."""
    rates = {}
    for name, arm in arms.items():
        rates[name] = []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(arm.calls):
                arm.step()
            rates[name].append(arm.items * arm.calls / (time.perf_counter() - t0))
    return rates


class LoadHalfway:
    """Three hogs, switched on when half of a measurement's work is done (counted in spin units, the
    same point for either way of timing) and left on to its end."""

    def __init__(self, total_units: int):
        self.hogs, self.done, self.half = Hogs(3), 0, total_units / 2
        time.sleep(0.2)  # the hogs' interpreters are up and waiting

    def work(self, units: int, n: int):
        spin(units * n)
        self.done += units
        if self.done >= self.half > self.done - units:
            self.hogs.on()


def under_load(fn, total_units: int):
    """fn(load) with a LoadHalfway of `total_units`."""
    load = LoadHalfway(total_units)
    try:
        return fn(load)
    finally:
        load.hogs.close()


@linux_only
def test_alternating_windows_keep_a_known_ratio_that_a_load_spoils_in_sequential_timing():
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})  # workloads and hogs on one CPU: a 4x load on any machine
    try:
        quiet = []
        for _ in range(5):
            t0 = time.perf_counter()
            spin(100_000)
            quiet.append(time.perf_counter() - t0)
        n = max(10_000, int(100_000 * 0.003 / min(quiet)))  # spin(n) ~ 3 ms on a quiet CPU: 30 ms windows

        # A does half B's work per call and makes twice its calls per window: the rate ratio A / B is 2
        def arms(load):
            return {"A": throughput.Arm(lambda: load.work(1, n), 1, calls=10),
                    "B": throughput.Arm(lambda: load.work(2, n), 1, calls=5)}
        rounds = 10
        total = 2 * rounds * 10 + 3  # spin units of both measurements, warm-up included
        # the same load, switched on halfway through the work of each measurement
        timing = under_load(lambda load: throughput.alternate(arms(load), rounds, warmup=1), total)
        naive = under_load(lambda load: sequential(arms(load), rounds), total - 3)
    finally:
        os.sched_setaffinity(0, old)
    alternated = throughput.ratio_stats(timing.round_ratios("A", "B"))
    seq = statistics.median(naive["A"]) / statistics.median(naive["B"])  # as the bench did
    assert alternated["rounds"] == rounds and [n for n, _ in timing.rounds[1]] == ["B", "A"]
    assert abs(alternated["ratio"] / 2 - 1) < 0.25, alternated  # 0.25: this test's 30 ms windows on a busy box
    # the load slowed the later rounds (to about a quarter of the CPU), and the rounds' ratios still hold
    assert min(timing.rates["A"]) < 0.6 * max(timing.rates["A"]), timing.rates
    assert abs(seq / 2 - 1) > 0.5, seq  # B was timed under the load, A without it
    assert abs(alternated["ratio"] / 2 - 1) < abs(seq / 2 - 1) / 2


@linux_only
def test_a_window_waits_for_the_work_its_steps_hand_to_worker_processes():
    code = ("import sys, time\nwhile sys.stdin.buffer.read(1):\n    t = time.perf_counter()\n"
            "    while time.perf_counter() - t < 0.2: pass")
    worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        assert worker.pid in throughput.child_pids()
        time.sleep(0.3)  # started and idle on its stdin

        def step():  # hands 0.2 s of work to the worker and returns at once
            worker.stdin.write(b"x")
            worker.stdin.flush()

        assert throughput._window(throughput.Arm(step, 1), 1, lambda: None) < 0.1  # blind to the worker
        time.sleep(0.4)
        seconds = throughput._window(throughput.Arm(step, 1, pids={worker.pid}), 1, lambda: None)
        assert 0.18 < seconds < 0.6
    finally:
        worker.kill()
        worker.wait()


def test_ratios_pair_each_window_with_the_reference_windows_next_to_it():
    assert throughput.bracket("k", ["t", "n", "o"]) == ["t", "k", "n", "k", "o"]
    # round 1: x between two ref windows (geometric mean 10); round 2, reversed: x next to one ref window
    rounds = [[("ref", 5.0), ("x", 30.0), ("ref", 20.0), ("y", 2.0)], [("y", 4.0), ("ref", 8.0), ("x", 16.0)]]
    timing = throughput.Timing(rounds, errors={"bad": "E: boom"}, info={"ref": {}, "x": {"gpu_peak_MiB": 1.0},
                                                                        "y": {}, "bad": {}})
    assert timing.round_ratios("x", "ref") == pytest.approx([3.0, 2.0])
    assert timing.round_ratios("y", "ref") == pytest.approx([0.1, 0.5])
    rows = throughput.summarize(timing, {"x": "ref", "y": "ref"})
    assert (rows["x"]["ratio"], rows["x"]["ratio_min"], rows["x"]["ratio_max"]) == pytest.approx((2.5, 2.0, 3.0))
    assert rows["x"]["img/s"] == 23.0 and rows["x"]["gpu_peak_MiB"] == 1.0 and rows["bad"] == {"error": "E: boom"}
    assert rows["ref"]["img/s"] == 8.0 and "ratio" not in rows["ref"]
    times = throughput.summarize(timing, {"x": "ref"}, unit="ms/1k queries", items_per_unit=1000)
    assert times["x"]["ratio"] == pytest.approx((1 / 3 + 1 / 2) / 2) and times["x"]["ms/1k queries"] == 1000 * 1000 / 23.0


@pytest.mark.slow
def test_every_bench_script_runs_in_its_smallest_mode(tmp_path):
    """A bench script no test runs breaks unseen (near_duplicates.py once imported a module that had
    moved): the two measuring scripts run end to end here, small, and write the rows they report.
    gpu_check.sh and its gpu_summary.py run in the rehearsal (tests/test_offline.py), offline_wheels.sh
    in tests/test_offline.py too."""
    import json

    from conftest import py

    py("bench/near_duplicates.py", "--quick", "--markdown", tmp_path / "near.md", timeout=900)
    md = (tmp_path / "near.md").read_text()
    for row in ("| demo | 60 (+30) | before |", "| scans | 60 (+30) | now |", "| jitter+wb |", "| signatures |",
                "| pairs and groups |", "Timing, 200 synthetic"):
        assert row in md, row
    out = py("bench/parallel_folds.py", "--folds", "2", "--epochs", "1", "--repeats", "1", timeout=900).stdout
    assert "| folds | " in out and "| ddp | " in out and "equal the sequential run's: True" in out
    # torch.compile's rows leave out: compiling on CPU takes minutes, and tests/test_speed.py covers it
    py("bench/throughput.py", "--smoke", "--skip", "compile", "--json", tmp_path / "speed.json", timeout=900)
    rows = json.loads((tmp_path / "speed.json").read_text())
    for row in ("train tensors", "train kit", "infer kit", "pipeline 224 workers 0", "retrieval 10,000 kit"):
        assert row in rows and "error" not in rows[row], (row, rows.get(row))


def test_t2i_rule_ceilings_on_the_real_annotations(tmp_path):
    """bench/t2i_rules.py: the figures ENTREP.md and docs/figures.md give for a ranker that cannot
    tell carriers apart (per pair 0.467, per caption 0.766, any carrier 1.0)."""
    from conftest import py

    py("bench/t2i_rules.py", "--markdown", tmp_path / "t2i.md", timeout=300)
    md = (tmp_path / "t2i.md").read_text()
    assert "| per caption (the leaderboard's weighing; report.json t2i) | 0.766 |" in md
    assert "| per pair (report.json t2i_pairs) | 0.467 |" in md and "| any carrier (report.json t2i_any) | 1.000 |" in md
