"""Codes calibrated against a frozen bank start where the loss gradient points (LoRA-GA's idea)."""

from __future__ import annotations

import pytest
import torch

from vbcompress.adapter import Adapter, LoraModule
from vbcompress.bank.calibrate import BankModel
from vbcompress.codec.layout import VBCode, VectorBank


def small_model(seed: int = 0, transposed: bool = False) -> BankModel:
    g = torch.Generator().manual_seed(seed)
    n, length, k, r, dim = 16, 4, 2, 2, 8
    bank = torch.randn(n, length, generator=g)

    def code(*shape):
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(torch.Size(shape).numel())]).reshape(*shape, k)
        return idx, torch.softmax(torch.randn(*shape, k, generator=g), -1)

    ia, wa = code(r, dim // length)
    ib, wb = code(dim // length, r)
    module = LoraModule("m", torch.zeros(r, dim), torch.zeros(dim, r), fan_in_fan_out=transposed)
    return BankModel(VectorBank(bank, k, {"m": VBCode(ia, wa, ib, wb)}), Adapter(modules={"m": module}))


@pytest.mark.parametrize("transposed", [False, True])
def test_the_gradient_start_keeps_the_starting_codes_and_admits_the_vector_the_loss_points_to(transposed):
    model = small_model(transposed=transposed)
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))

    def loss(subs):
        return ((model.deltas(subs)["m"] - target) ** 2).sum()

    with torch.no_grad():
        before = model.deltas()["m"].clone()
        selected = [model.codes(i) for i in range(len(model.logits))]
    subs = [s.detach().requires_grad_() for s in model.subvectors()]
    model.order_entrants(list(torch.autograd.grad(loss(subs), subs)))

    with torch.no_grad():
        # the decoded ΔW and every code's selection are what they were
        torch.testing.assert_close(model.deltas()["m"], before)
        for i, (idx, w) in enumerate(selected):
            now_idx, now_w = model.codes(i)
            assert torch.equal(now_idx, idx)
            torch.testing.assert_close(now_w, w)
        # per sub-vector, the unselected vector ranked first is the one towards which the loss falls fastest,
        # measured by evaluating the loss itself (central differences, exact on this quadratic loss), not
        # through the gradient
        eps, checked = 1e-2, 0
        for i, logits in enumerate(model.logits):
            flat = logits.reshape(-1, logits.shape[-1])
            chosen = selected[i][0].reshape(flat.shape[0], -1)
            for row in range(flat.shape[0]):
                gains = {}
                for j in range(flat.shape[1]):
                    if j in chosen[row].tolist():
                        continue
                    step = [s.clone() for s in model.subvectors()]
                    toward = model.bank[j] - step[i][row]
                    step[i][row] = eps * toward / toward.norm()  # a unit of distance towards b_j
                    ahead, back = [s.clone() for s in model.subvectors()], [s.clone() for s in model.subvectors()]
                    ahead[i][row] += step[i][row]
                    back[i][row] -= step[i][row]
                    gains[j] = (float(loss(back)) - float(loss(ahead))) / (2 * eps)
                best = max(gains, key=gains.get)
                if gains[best] <= 0:
                    continue
                entrant = max(gains, key=lambda j: float(flat[row, j]))
                assert entrant == best or gains[entrant] > gains[best] - 1e-2 * abs(gains[best])
                # it sits where every unselected logit started (init_gap below the weakest selected one): only the
                # order changed, not how soon a vector can enter
                weakest = float(flat[row, chosen[row]].min())
                assert float(flat[row, entrant]) == pytest.approx(weakest - model.init_gap, abs=1e-5)
                checked += 1
        assert checked > 0


def test_a_negative_gradient_start_is_refused_in_library_terms():
    from vbcompress import CalibrationSettings
    from vbcompress.errors import SettingError

    with pytest.raises(SettingError, match="gradient_start"):
        CalibrationSettings(gradient_start=-1).check()
    CalibrationSettings(gradient_start=0).check()  # 0 turns the start off
