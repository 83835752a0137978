"""The factor store: unions, refinements, pins."""

from hypothesis import given
from hypothesis import strategies as st

from exprune_fx.passes.factors import FactorStore, common_refinement


def test_refine_applies_to_the_whole_class():
    s = FactorStore()
    a, b = s.new(12), s.new(12)
    s.unite(a, b)
    s.refine([a], [3, 4])
    assert [s.size(v) for v in s.leaves(b)] == [3, 4]
    assert [s.find(v) for v in s.leaves(a)] == [s.find(v) for v in s.leaves(b)]


def test_compatible_splits_merge_to_common_refinement():
    s = FactorStore()
    a, b = s.new(16), s.new(16)
    s.refine([a], [2, 8])
    s.refine([b], [4, 4])
    s.unite(a, b)
    assert [s.size(v) for v in s.leaves(a)] == [2, 2, 4]
    assert all(not s.pins(v) for v in s.leaves(a))


def test_incompatible_splits_pin_everything():
    s = FactorStore()
    a, b = s.new(6), s.new(6)
    s.refine([a], [2, 3])
    s.refine([b], [3, 2])
    s.unite(a, b, "clash")
    assert all(s.pins(v) == ("clash",) for v in s.leaves(a) + s.leaves(b))


def test_pin_survives_union_and_refinement():
    s = FactorStore()
    a, b, c = s.new(8), s.new(8), s.new(8)
    s.pin(a, "input")
    s.unite(b, c)
    s.refine([c], [2, 4])
    s.unite(a, b)
    assert [s.pins(v) for v in s.leaves(c)] == [("input",), ("input",)]


def test_merge_of_leaves_is_a_new_refined_variable():
    s = FactorStore()
    c, h, w = s.new(3), s.new(4), s.new(5)
    (flat,) = s.refine([c, h, w], [60])
    assert [s.find(v) for v in s.leaves(flat)] == [s.find(c), s.find(h), s.find(w)]


@given(st.lists(st.integers(2, 5), min_size=1, max_size=4), st.data())
def test_common_refinement_refines_both(a, data):
    n = 1
    for x in a:
        n *= x
    b = data.draw(st.sampled_from([[n], list(reversed(a)), a]))
    common = common_refinement(a, b)
    if common is None:
        return
    for seq in (a, b):  # each entry of seq is a product of a contiguous run of common
        i = 0
        for size in seq:
            prod = 1
            while prod < size:
                prod *= common[i]
                i += 1
            assert prod == size
        assert i == len(common)
