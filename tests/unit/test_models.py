"""The bundled models refuse sizes that would build a model that cannot learn."""

import pytest

from bilevel.models import MLP
from bilevel.models.tiny_gpt import TinyGPT


@pytest.mark.parametrize(
    "build,field",
    [
        (lambda: MLP(4, 2, hidden=0), "hidden"),
        (lambda: MLP(4, 2, hidden=[8, 0]), "hidden[1]"),
        (lambda: MLP(0, 2), "in_dim"),
        (lambda: MLP(4, 2, hidden=2.5), "hidden"),
        (lambda: TinyGPT(16, 8, heads=0), "heads"),
        (lambda: TinyGPT(16, 8, d_model=0), "d_model"),
        (lambda: TinyGPT(16, 8, layers=-1), "layers"),
        (lambda: TinyGPT(16, 8, d_model=30, heads=4), "d_model"),
    ],
)
def test_bad_sizes_are_refused_by_name(build, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_good_sizes_build():
    assert MLP(4, 2, hidden=[8, 3])(__import__("torch").zeros(5, 4)).shape == (5, 2)
    TinyGPT(16, 8, layers=0)  # a bigram model: no blocks is allowed
