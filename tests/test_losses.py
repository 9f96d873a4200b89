"""kd_loss against values computed by hand in the test; the KD and cross-entropy modules."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillab import conf
from distillab.distill.methods.kd import KD, kd_loss, kd_terms
from distillab.distill.methods.none import CrossEntropy
from distillab.settings import ConfigError


def _hand_kl(p_teacher: list[float], p_student: list[float]) -> float:
    return sum(p * math.log(p / q) for p, q in zip(p_teacher, p_student))


def _softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in logits]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]
    targets = [1, 2]
    lam, temperature = 0.3, 4.0
    ce = -sum(math.log(_softmax(s, 1.0)[y]) for s, y in zip(student, targets)) / 2
    kl = sum(_hand_kl(_softmax(t, temperature), _softmax(s, temperature)) for s, t in zip(student, teacher)) / 2
    expected = (1 - lam) * ce + lam * temperature**2 * kl
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(targets), lam, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_lambda_zero_is_cross_entropy():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert kd_loss(s, t, y, 0.0, 3.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_identical_logits_give_zero_kd_term():
    torch.manual_seed(0)
    s, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    terms = kd_terms(s, s.clone(), y, 0.7, 2.0)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.3 * F.cross_entropy(s, y).item(), rel=1e-6)


def test_temperature_squared_factor():
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    temperature = 3.0
    kl = F.kl_div(
        F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), log_target=True, reduction="batchmean"
    )
    assert kd_loss(s, t, y, 1.0, temperature).item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)


def test_gradient_reaches_the_student_only():
    torch.manual_seed(2)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t, torch.tensor([0, 1, 2, 0]), 0.5, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_pure_distillation_ignores_labels():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    a = kd_loss(s, t, torch.tensor([0, 0, 0, 0]), 1.0, 2.0)
    b = kd_loss(s, t, torch.tensor([2, 1, 2, 1]), 1.0, 2.0)
    assert a.item() == b.item()


def test_loss_modules_return_named_terms():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    kd = KD(lam=0.5, temperature=2.0, standardize=False)(s, t, y)
    assert set(kd) == {"ce", "kd", "loss"}
    assert kd["loss"].item() == pytest.approx((kd["ce"] + kd["kd"]).item())
    ce = CrossEntropy()(s, None, y)
    assert ce["loss"].item() == pytest.approx(F.cross_entropy(s, y).item())


def test_kd_module_takes_the_configured_values():
    kd = conf.build("distill", "kd")
    assert isinstance(kd, KD) and (kd.lam, kd.temperature) == (0.5, 2.0)  # conf/distill/kd.yaml
    assert conf.build("distill", "kd", lam=0.9).lam == 0.9


@pytest.mark.parametrize("kwargs", [{"lam": 1.5}, {"lam": -0.1}, {"temperature": 0.0}])
def test_kd_loss_module_rejects_bad_weights(kwargs):
    with pytest.raises(ValueError):  # a ConfigError naming the key, in one line
        KD(**{"lam": 0.5, "temperature": 2.0, "standardize": False, **kwargs})
    with pytest.raises(ConfigError, match=rf"^{next(iter(kwargs))}=\S+ is not allowed: [^\n]+$"):
        KD(**{"lam": 0.5, "temperature": 2.0, "standardize": False, **kwargs})


# -- the teacher's side computed once (cached teacher outputs) ------------------------------------
def _reference_terms(s, t, y, lam, temperature, standardize):
    """(1 − λ)·CE over the labelled rows and λ·T²·KL, from the definitions, row by row in float64."""

    def zscore(row):
        return (row - row.mean()) / (row.std(unbiased=True) + 1e-7)

    ce_rows, kl_rows = [], []
    for i in range(len(s)):
        if int(y[i]) != -1:
            ce_rows.append(torch.logsumexp(s[i], 0) - s[i, int(y[i])])
        a, b = (zscore(s[i]), zscore(t[i])) if standardize else (s[i], t[i])
        p = torch.exp(b / temperature) / torch.exp(b / temperature).sum()
        q = torch.exp(a / temperature) / torch.exp(a / temperature).sum()
        kl_rows.append((p * (torch.log(p) - torch.log(q))).sum())
    ce = torch.stack(ce_rows).mean() if ce_rows else s.new_zeros(())
    return (1 - lam) * ce, lam * temperature**2 * torch.stack(kl_rows).mean()


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize(("lam", "temperature"), [(0.0, 2.0), (0.3, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 3.0)])
def test_forward_prepared_on_prepared_rows_is_forward_and_the_definition(lam, temperature, standardize):
    generator = torch.Generator().manual_seed(3)
    s = torch.randn(12, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    table = 3 * torch.randn(40, 7, dtype=torch.float64, generator=generator)
    index = torch.randperm(40, generator=generator)[:12]
    y = torch.randint(0, 7, (12,), generator=generator)
    y[[2, 5]] = -1  # UNLABELLED: CE over the other ten, KL over all twelve
    method = KD(lam=lam, temperature=temperature, standardize=standardize)
    prepared = method.prepare_teacher(table)
    # row by row: a whole table's rows are the prepared rows
    torch.testing.assert_close(prepared[index], method.prepare_teacher(table[index]), rtol=0, atol=1e-14)
    got = method.forward_prepared(s, prepared[index], y)
    direct = method(s, table[index], y)
    ce, kd = _reference_terms(s.detach(), table[index], y, lam, temperature, standardize)
    for name, expected in (("ce", ce), ("kd", kd), ("loss", ce + kd)):
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name].detach(), expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(got[name], direct[name])
    # the gradient of the definition
    (grad,) = torch.autograd.grad(got["loss"], s)
    s_ref = s.detach().clone().requires_grad_(True)
    ce_ref, kd_ref = _reference_terms(s_ref, table[index], y, lam, temperature, standardize)
    (grad_ref,) = torch.autograd.grad(ce_ref + kd_ref, s_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_a_float32_teacher_with_a_float64_student_sums_in_float64():
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5)
    terms = kd_terms(s, t, torch.tensor([0, 1, 2, 3, 4, -1]), 0.5, 2.0)
    assert terms["kd"].dtype == terms["ce"].dtype == torch.float64
    expected = kd_terms(s, t.double(), torch.tensor([0, 1, 2, 3, 4, -1]), 0.5, 2.0)["kd"]
    torch.testing.assert_close(terms["kd"], expected, rtol=1e-6, atol=0)  # the teacher's side was float32


def test_pure_distillation_from_prepared_rows_needs_no_labels_and_lambda_zero_no_teacher():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    method = KD(lam=1.0, temperature=2.0, standardize=False)
    unlabelled = method.forward_prepared(s, method.prepare_teacher(t), torch.full((4,), -1))
    assert unlabelled["ce"].item() == 0.0 and unlabelled["kd"].item() > 0
    ce_only = KD(lam=0.0, temperature=2.0, standardize=False)
    y = torch.tensor([0, 1, 2, 0])
    assert torch.equal(ce_only.forward_prepared(s, None, y)["loss"], ce_only(s, None, y)["loss"])
    assert ce_only(s, None, y)["loss"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
