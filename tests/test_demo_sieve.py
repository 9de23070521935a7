"""The demo with data sieving (``smartfrz-fast demo --sieve FRACTION``), in its --quick form."""

import re

import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install scikit-learn)")
pytest.importorskip("tqdm", reason="the demo needs tqdm")

from smartfrz_fast import cli, demo  # noqa: E402


def test_cli_demo_with_sieving_runs_fewer_steps_and_counts_them(capsys):
    # quick: 1024 samples, batch 64, 2 epochs -> 32 steps; 75% active -> 12 steps per epoch
    assert cli.main(["demo", "--quick", "--no-progress", "--threads", "1", "--policy", "freezeout", "--sieve", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "sieve  : the freezing run trains on 75% of the samples" in out
    rows = re.findall(r"^\s+(full training|with freezeout\+sieve)\s+([\d.]+)%", out, re.M)
    assert [r[0] for r in rows] == ["full training", "with freezeout+sieve"], out
    engine = float(re.search(r"training FLOPs saved \(engine's count\): ([\d.]+)%", out).group(1))
    m = re.search(r"with sieving: (\d+) steps instead of (\d+); training FLOPs saved vs full training: ([\d.]+)%", out)
    assert m, out
    assert (int(m.group(1)), int(m.group(2))) == (24, 32)
    # 24/32 of the steps, each saving the engine's share: 1 - 0.75 * (1 - engine)
    assert float(m.group(3)) == pytest.approx(100 * (1 - 0.75 * (1 - engine / 100)), abs=0.06)
    assert "Freeze timeline" in out


@pytest.mark.parametrize("bad", ["0", "1.5", "0.01"])  # 0.01 of 1024 samples < one batch of 64
def test_bad_sieve_fraction_is_a_usage_error(bad):
    with pytest.raises(SystemExit) as info:
        demo.main(["--quick", "--sieve", bad])
    assert info.value.code == 2
