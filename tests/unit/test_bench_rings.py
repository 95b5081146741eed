"""``vdpasim bench rings``: the command's output, and the checks that make its figures trustworthy.

Run small (one run, a few hundred packets); no timing is asserted, only shapes, counts and verdicts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vdpasim.bench import rings
from vdpasim.cli import main

KEYS = {"layout", "packet_bytes", "burst", "numba_mpps", "c_mpps", "ratio"}


@pytest.fixture(scope="module")
def reference():
    return rings.Reference(rings.build_reference())


@pytest.fixture
def bench_64():
    bench = rings.RingBench("split", 64)
    yield bench
    bench.close()


def test_json_lists_every_configuration(capsys):
    assert main(["bench", "rings", "--runs", "1", "--packets", "512", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert isinstance(results, list)
    configurations = {(r["layout"], r["packet_bytes"], r["burst"]) for r in results}
    assert configurations == {
        (layout, size, burst) for layout in ("split", "packed") for size in (64, 1500) for burst in (32, 256)
    }
    for r in results:
        assert r.keys() >= KEYS
        assert r["numba_mpps"] > 0 and r["c_mpps"] > 0
        # The rates are rounded in the JSON, the ratio is not: on a loaded machine a tiny rate makes that
        # rounding visible in the quotient, so compare relatively.
        assert r["ratio"] == pytest.approx(r["numba_mpps"] / r["c_mpps"], rel=0.01, abs=0.002)
        assert r["runs"] == 1
        assert r["packets"] == 512  # each side moved (and verified) 512 packets per run


def test_options_select_configurations_and_round_to_whole_bursts(capsys):
    argv = ["bench", "rings", "--layout", "packed", "--size", "1500", "--burst", "32", "--runs", "2"]
    assert main([*argv, "--packets", "100", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert (result["layout"], result["packet_bytes"], result["burst"]) == ("packed", 1500, 32)
    assert result["runs"] == 2
    assert result["packets"] == 128


def test_table_without_json(capsys):
    argv = ["bench", "rings", "--layout", "split", "--size", "64", "--burst", "32", "--runs", "1", "--packets", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Numba/C" in out and "split" in out


def test_missing_compiler_is_reported(capsys):
    argv = ["bench", "rings", "--runs", "1", "--packets", "32", "--cc", "no-such-cc-vdpasim", "--json"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "C compiler 'no-such-cc-vdpasim' not found" in err


@pytest.mark.parametrize("layout", ["split", "packed"])
@pytest.mark.parametrize("size", [64, 1500])
def test_both_sides_move_every_packet_and_leave_the_same_state(reference, layout, size):
    bench = rings.RingBench(layout, size)
    try:
        bursts, burst = 5, 256  # 1280 packets: five full turns of a 256-entry ring
        bench.run_c(reference, bursts, burst)
        assert bench.result[rings.R_TX_REAPED] == bench.result[rings.R_RX_REAPED] == bursts * burst
        bench.verify("C", bursts * burst, bursts)
        c_state = bench.snapshot()
        bench.run_numba(bursts, burst)
        assert bench.result[rings.R_TX_REAPED] == bench.result[rings.R_RX_REAPED] == bursts * burst
        bench.verify("Numba", bursts * burst, bursts)
        assert bench.txq.counters()["packets"] == bench.rxq.counters()["bytes"] // size == bursts * burst
        bench.compare(c_state, bench.snapshot())
    finally:
        bench.close()


def test_verify_rejects_a_corrupted_frame(bench_64):
    bench_64.run_numba(2, 32)
    bench_64.verify("Numba", 64, 2)
    # Flip one payload byte of the frame that last went through RX slot 3.
    offset = bench_64.rx_buffers + rings.BUF_STRIDE * 3 + rings.HDR_LEN + 40
    bench_64.region.data[offset] ^= 0xFF
    with pytest.raises(rings.VerificationError, match="RX buffer 3 corrupted"):
        bench_64.verify("Numba", 64, 2)


def test_verify_rejects_a_short_count(bench_64):
    bench_64.run_numba(2, 32)
    with pytest.raises(rings.VerificationError, match="TX used entries reaped 64, expected 96"):
        bench_64.verify("Numba", 96, 3)


def test_compare_names_the_first_difference(reference, bench_64):
    bench_64.run_c(reference, 1, 32)
    c_state = bench_64.snapshot()
    bench_64.run_numba(1, 32)
    numba_state = bench_64.snapshot()
    bench_64.compare(c_state, numba_state)
    numba_state[2][0]["used_idx"] += 1
    with pytest.raises(rings.VerificationError, match="RX queue used_idx is 33 after the Numba run but 32"):
        bench_64.compare(c_state, numba_state)
    numba_state[2][0]["used_idx"] -= 1
    mem = numba_state[0]
    mem[bench_64.queue_area + 7] ^= 1
    with pytest.raises(rings.VerificationError, match=r"1 bytes, first in the RX ring offset 0x7"):
        bench_64.compare(c_state, numba_state)


def test_reference_layouts_match_python(reference):
    assert reference._string("ring_queue_fields").split(",") == list(rings.QUEUE_DTYPE.names)
    assert np.dtype(rings.QUEUE_DTYPE).itemsize == 8 * len(rings.QUEUE_DTYPE.names)


def test_other_queue_sizes(capsys):
    argv = ["bench", "rings", "--size", "64", "--burst", "64", "--queue-size", "64", "--runs", "1"]
    assert main([*argv, "--packets", "640", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["layout"], r["packets"]) for r in results] == [("split", 640), ("packed", 640)]
    assert main([*argv, "--layout", "split", "--queue-size", "100", "--packets", "64"]) == 1
    assert "queue size 100 invalid for a split ring" in capsys.readouterr().err
