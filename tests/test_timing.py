"""The phase clock behind summary.json's "timing": each second goes to the innermost open phase."""
import pytest

from experiments.timing import PhaseClock


def test_nested_phases_charge_the_innermost_and_the_rest_is_other():
    t = [0.0]
    clock = PhaseClock(now=lambda: t[0])
    t[0] = 1.0  # outside every phase: other
    with clock.phase("eval"):
        t[0] = 3.0  # eval: 2
        with clock.phase("umap"):
            t[0] = 7.0  # umap: 4, not eval
        t[0] = 8.0  # eval again: 1
    with clock.phase("training"):
        t[0] = 10.5
    with clock.phase("eval"):
        t[0] = 11.0
    split = clock.split()
    assert split["eval"] == 3.5 and split["umap"] == 4.0 and split["training"] == 2.5
    assert split["other"] == 1.0 and split["total"] == 11.0 and split["harvest"] == 0.0


def test_a_phase_left_by_an_exception_is_still_charged():
    t = [0.0]
    clock = PhaseClock(now=lambda: t[0])
    with pytest.raises(RuntimeError), clock.phase("training"):
        t[0] = 2.0
        raise RuntimeError
    t[0] = 3.0
    assert clock.split()["training"] == 2.0 and clock.split()["other"] == 1.0


def test_an_unknown_phase_is_refused_rather_than_lost_from_the_split():
    clock = PhaseClock(now=iter([0.0, 1.0, 2.0]).__next__)
    with pytest.raises(ValueError, match="unknown phase 'feature'"):
        with clock.phase("feature"):
            pass
