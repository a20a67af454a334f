"""A LoRA-GA-style start for codes calibrated against a frozen bank: order the entrants by where the gradient points.

Calibration trains full logits over the bank with a top-k admixture; the unselected logits all start at one value
`init_gap` below the weakest selected one, and top-k's gradient never reaches them, so when a selected logit falls
the vector that enters is an arbitrary tie. Here one gradient of the calibration loss (first 4 batches) at the
starting codes gives, per sub-vector u with gradient g, each bank vector's first-order gain -g·(b_j - u); the
unselected logits are then spread below the threshold by that gain (the best within 0.5 of it), so the vectors that
enter are the ones the objective points to. Both runs: `add`'s defaults (100 steps, code lr 0.1), the same
training loop; KL retention on 48 held-out lines. The gemma3-270m-ner-r8 adapter against the three attn-r4
siblings' bank (N=256, L=128), codes at rank R.

Usage: python benchmarks/gradient_start.py [R] [plain,grad]
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_add import SIBLINGS, kept
from causal import ADAPTERS, CALIBRATION, GEMMA, HELDOUT

from vbcompress import CalibrationSettings, FitSettings, load_adapter
from vbcompress.bank.calibrate import BankModel, Calibration, train
from vbcompress.bank.pipeline import fit_settings_for, run_fit
from vbcompress.basemodel import Base, read_texts
from vbcompress.codec.layout import VectorBank, tile_B, untile_B
from vbcompress.collection import Collection, pack
from vbcompress.collection.hold import sliced
from vbcompress.retention import Probe


def main() -> None:
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["plain", "grad"]
    with tempfile.TemporaryDirectory() as tmp:
        fit = FitSettings(num_vectors=256, vector_length=128)
        pack([ADAPTERS / n for n in SIBLINGS], Path(tmp) / "c", fit)
        bank = Collection(Path(tmp) / "c").bank.float()
    source = load_adapter(ADAPTERS / "gemma3-270m-ner-r8")
    base = Base(GEMMA, source)
    probe = Probe(base, read_texts(HELDOUT)[:48], source.delta_weights(), 64)
    codes = run_fit({m: mod.folded() for m, mod in source.modules.items()}, fit_settings_for([source], fit), None, bank=bank).codes
    start = sliced(codes, rank)
    st = CalibrationSettings()
    cal = Calibration(source, base, read_texts(CALIBRATION), st)
    targets = cal.targets()
    L = bank.shape[1]

    def grad_start(model, nb=4, gap=4.0, reach=3.5):
        with torch.no_grad():
            deltas = model.deltas()
        d = {n: t.detach().requires_grad_() for n, t in deltas.items()}
        loss = sum(cal.objective.loss(cal.batches[i], targets[i], d) for i in range(nb))
        loss.backward()
        with torch.no_grad():
            for j, name in enumerate(model.names):
                G = d[name].grad
                if model.layout[name]:
                    G = G.T
                (ia, wa), (ib, wb) = model.codes(2 * j), model.codes(2 * j + 1)
                asub = (wa[..., None] * bank[ia]).sum(-2)  # [r, in/L, L]
                bsub = (wb[..., None] * bank[ib]).sum(-2)  # [out/L, r, L]
                a, b = asub.reshape(asub.shape[0], -1), untile_B(bsub)
                ga = (b.T @ G).reshape(asub.shape)
                gb = tile_B(G @ a.T, L).reshape(bsub.shape)
                for lg, g, u in ((model.logits[2 * j], ga, asub), (model.logits[2 * j + 1], gb, bsub)):
                    gain = -(g @ bank.T) + (g * u).sum(-1, keepdim=True)  # first-order loss decrease moving to b_j
                    top, idx = lg.topk(model.topk, dim=-1)
                    rel = (gain / gain.amax(-1, keepdim=True).clamp_min(1e-30)).clamp(0, 1)
                    new = top.min(-1, keepdim=True).values - gap + reach * rel
                    lg.copy_(new.scatter(-1, idx, top))
        return model

    def run(mode):
        model = BankModel(VectorBank(bank, 2, start), source)
        model.bank.requires_grad_(False)
        t = time.perf_counter()
        if mode == "grad":
            grad_start(model)

        def loss_at(step):
            i = step % len(cal.batches)
            return cal.objective.loss(cal.batches[i], targets[i], model.deltas())

        train([{"params": list(model.logits), "lr": st.code_lr * 10}], st.code_steps, loss_at, None, "c")
        return kept(probe, model.vector_bank(), source), time.perf_counter() - t

    for mode in modes:
        print(mode, rank, run(mode), flush=True)


if __name__ == "__main__":
    main()
