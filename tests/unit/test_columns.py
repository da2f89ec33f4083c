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
