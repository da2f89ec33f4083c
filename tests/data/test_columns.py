import pytest
import torch

from bilevel.data.columns import domain_columns, num_rows


def test_domain_columns_concatenates_nested_parts_and_numbers_the_domains():
    parts = [
        {"x": {"ids": torch.arange(6).view(3, 2)}, "y": torch.tensor([0, 1, 2])},
        {"x": {"ids": torch.arange(6, 8).view(1, 2)}, "y": torch.tensor([3])},
    ]
    out = domain_columns(parts)
    assert torch.equal(out["x"]["ids"], torch.arange(8).view(4, 2))
    assert torch.equal(out["y"], torch.tensor([0, 1, 2, 3]))
    assert torch.equal(out["domain"], torch.tensor([0, 0, 0, 1]))
    assert out["domain"].dtype == torch.int64
    assert num_rows(out) == 4


def test_columns_of_different_lengths_are_named_with_their_lengths():
    from bilevel.data import DomainData
    from bilevel.errors import ConfigError

    x = torch.randn(30, 2)
    domain = torch.arange(30) % 3
    y = torch.zeros(30, dtype=torch.long)
    meta = {"x": x[:8], "y": y[:8]}
    with pytest.raises(ConfigError, match=r"data.train: .*\(x 30, y 20, domain 30\)"):
        DomainData(["a", "b", "c"], {"x": x, "y": y[:20], "domain": domain}, meta).validate()
    nested = {"x": {"ids": x, "mask": x[:5]}, "y": y, "domain": domain}
    with pytest.raises(ConfigError, match=r"\(x.ids 30, x.mask 5, y 30, domain 30\)"):
        DomainData(["a", "b", "c"], nested, meta).validate()
    with pytest.raises(ConfigError, match=r"data.meta: .*\(x 8, y 7\)"):
        DomainData(
            ["a", "b", "c"], {"x": x, "y": y, "domain": domain}, {"x": x[:8], "y": y[:7]}
        ).validate()
    with pytest.raises(ConfigError, match=r"data.test: .*\(x 8, y 6\)"):  # before training
        DomainData(
            ["a", "b", "c"], {"x": x, "y": y, "domain": domain}, meta, {"x": x[:8], "y": y[:6]}
        ).validate()


def test_data_of_another_type_is_named():
    """A list where a dict of columns is meant failed with a message about a missing 'domain'
    column or an AttributeError; a string of names was one domain per character."""
    from bilevel.data import DomainData
    from bilevel.errors import ConfigError

    x, domain = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    train, meta = {"x": x, "domain": domain}, {"x": x}
    for data, match in [
        (DomainData(["a"], [x, domain], meta), "data.train: must be a dict of columns"),
        (DomainData(["a"], [{"x": x}], meta), r"join them with bilevel.data.domain_columns\(parts"),
        (DomainData(["a"], train, [x]), "data.meta: must be a dict of columns"),
        (DomainData(["a"], train, meta, (x,)), "data.test: must be a dict of columns"),
        (DomainData("ab", train, meta), "data.names: must be a list of names"),
        (DomainData(["a"], {"x": x, "domain": [0, 0, 0, 0]}, meta), "'domain' must be an int64"),
    ]:
        with pytest.raises(ConfigError, match=match):
            data.validate()
