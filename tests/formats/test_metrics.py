import math

import torch

from lowbit.formats import cosine_similarity, error_report, max_abs_error, mse, sqnr_db


def test_metrics_on_known_values():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    approx = ref + torch.tensor([0.1, -0.1, 0.1, -0.1])
    assert mse(ref, approx) == __import__("pytest").approx(0.01)
    assert sqnr_db(ref, approx) == __import__("pytest").approx(10 * math.log10(30 / 0.04))
    assert max_abs_error(ref, approx) == __import__("pytest").approx(0.1)
    assert cosine_similarity(ref, ref * 3) == __import__("pytest").approx(1.0)
    assert sqnr_db(ref, ref) == math.inf
    assert set(error_report(ref, approx)) == {"mse", "sqnr_db", "max_abs_error", "cosine"}
