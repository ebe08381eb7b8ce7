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
