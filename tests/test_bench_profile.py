"""scripts/bench.py's profile summary: when the compute stream works and when it waits (the GPU run is by hand)."""

import sys

from runner import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench  # noqa: E402


def test_compute_timeline_merges_overlaps_and_sets_copies_apart():
    activities = [
        ("gemm", 0, 100), ("attention", 50, 150),  # overlapping: one span, 150 us
        ("Memcpy HtoD (Pinned -> Device)", 120, 700),  # a side-stream copy: neither compute nor a gap's filler
        ("swiglu", 155, 160),  # 5 us after the span: a launch gap
        ("rmsnorm", 400, 450),  # 240 us after: the compute stream waited
        ("gemm", 2450, 2500),  # 2,000 us after
    ]
    lines = bench.compute_timeline(activities, wall_us=3000, steps=1)
    # Busy 150 + 5 + 50 + 50 = 255 us; waiting 3000 - 255 = 2745 us.
    assert lines[0] == ("compute kernels busy 0.3 ms/step, waiting 2.7 ms/step of 3.0; host-link copies 0.6 ms/step "
                        "beside them")
    rows = {cells[0]: cells[1:] for cells in (line.strip("|").split("|") for line in lines[4:])}
    assert {label.strip(): [c.strip() for c in cells] for label, cells in rows.items()} == {
        "0-10 us": ["1", "0.0"], "10-100 us": ["0", "0.0"], "100-1000 us": ["1", "0.2"], ">= 1000 us": ["1", "2.0"]}


def test_waits_are_put_down_to_a_late_host_or_to_the_device():
    kernels = [
        ("gemm", 0, 100, 1),
        ("rmsnorm", 300, 350, 2),  # launched at 250, after the GPU went idle at 100: the host was late
        ("Memcpy HtoD (Pinned -> Device)", 350, 900, 3),  # beside the compute: not a gap's end
        ("Memcpy DtoD (Device -> Device)", 350, 360, 4),  # on the compute stream: busy
        ("attention", 1000, 1100, 5),  # launched at 40, long before: it waited on the device
        ("swiglu", 1105, 1110, 6),  # 5 us: back to back, not a wait
        ("rope", 1500, 1510, 7),  # no launch in the trace
    ]
    launches = {1: (0, 5), 2: (240, 250), 3: (30, 35), 4: (260, 262), 5: (36, 40), 6: (41, 45)}
    host_calls = [("cudaEventSynchronize", 90, 230), ("cudaLaunchKernel", 240, 250), ("cudaLaunchKernel", 36, 40)]
    lines = bench.wait_causes(kernels, launches, host_calls, steps=1)
    rows = {cells[0].strip(): [c.strip() for c in cells[1:]]
            for cells in (line.strip("|").split("|") for line in lines[2:5])}
    # Host late: 100-300 (200 us); on the device: 360-1000 (640 us); unknown: 1110-1500 (390 us).
    assert rows == {"host late": ["1", "0.2"], "on the device": ["1", "0.6"], "launch not in the trace": ["1", "0.4"]}
    # The GPU waited for the host from 100 until the launch began at 240: the synchronize covers
    # 100-230 of it (130 us), the launch itself none.
    assert lines[6] == "host calls running while the GPU waited for the host (ms/step): cudaEventSynchronize 0.1"
    assert lines[10:] == ["| attention | on the device | 0.6 |", "| rope | launch not in the trace | 0.4 |",
                          "| rmsnorm | host late | 0.2 |"]
