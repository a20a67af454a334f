"""Causal LMs: calibration and LM-native fidelity (KL retention, top-1 agreement, perplexity).

The harness and the objectives are checked exactly on a tiny GPT-2; the real run is Gemma 3 270M, built
once by ../shared/bases/make_gemma3_270m.sh (skipped locally when it cannot be built, run under CI).
"""

from __future__ import annotations

import json

import pytest
import torch

from vbcompress import CalibrationSettings, FitSettings, load_adapter
from vbcompress.bank import fit
from vbcompress.bank.calibrate import TokenKL
from vbcompress.bank.pipeline import calibration_texts
from vbcompress.basemodel import Base, LowRank, bfloat16_flags, read_texts
from vbcompress.compress import lora2vb
from vbcompress.errors import FormatError, SettingError, VBCompressError
from vbcompress.evaluate import evaluate
from vbcompress.files import REPORT_FILE
from vbcompress.retention import Probe, retention

from .conftest import ADAPTERS, REPO, tiny_causal_base, tiny_causal_lora

CALIBRATION = REPO / "examples" / "text" / "calibration.txt"
HELDOUT = REPO / "examples" / "text" / "heldout.txt"
GEMMA_ADAPTER = ADAPTERS / "gemma3-270m-attn-r4"
WORDS = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10 w11", "w12 w13 w14 w15 w16 w17 w18", "w20 w21 w22"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    base = tiny_causal_base(root / "base")
    lora = tiny_causal_lora(base, root / "lora")
    return base, lora


def test_hidden_states_and_head_reproduce_the_model_logits(tiny):
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    batch = base.encode(WORDS, 16)
    full = base.forward(batch, adapter.delta_weights())
    h = base.hidden(batch, adapter.delta_weights())
    assert base._decoder is not None  # the decoder alone, not the model with its head
    assert torch.allclose(base.logits(h), full, atol=1e-5)
    ids = torch.randint(96, (h.shape[1], 5), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(base.logits_at(h[0], ids), full[0].gather(-1, ids), atol=1e-5)


def test_top_k_target_over_the_whole_vocabulary_is_the_exact_kl(tiny):
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    teacher = adapter.delta_weights()
    student = {n: 0.3 * d for n, d in teacher.items()}
    batch = base.encode(WORDS, 16)
    exact, sparse = TokenKL(base, teacher, 0), TokenKL(base, teacher, 96)
    e = exact.loss(batch, exact.target(batch), student)
    s = sparse.loss(batch, sparse.target(batch), student)
    assert float(e) > 0.01 and float(s) == pytest.approx(float(e), rel=1e-4)
    # a small K is an approximation of it, not the same number
    four = TokenKL(base, teacher, 4)
    assert float(four.loss(batch, four.target(batch), student)) != pytest.approx(float(e), rel=1e-2)


def test_the_bfloat16_screen_picks_exactly_the_float32_top_tokens(tiny):
    """Teacher targets rank the vocabulary in bfloat16; where that cannot tell tokens apart, the rows are
    formed in float32, so the tokens trained on are always the float32 top K."""
    base_dir, lora = tiny
    base = Base(base_dir, load_adapter(lora))
    gen = torch.Generator().manual_seed(0)
    w = base.head.weight
    with torch.no_grad():  # 88 tokens bfloat16 cannot tell apart, float32 can
        w[8:] = w[8] + 1e-4 * torch.randn(w[8:].shape, generator=gen)
    h = 3 * torch.randn(300, w.shape[1], generator=gen)
    k = 12
    want = base.logits(h).topk(k, -1)
    screen = base.screen()
    top, ids = base.top_logits(h, k, screen)
    assert torch.equal(ids.sort(1).values, want.indices.sort(1).values)
    assert torch.allclose(top, want.values, atol=1e-5)
    # the bfloat16 ranking alone picks other tokens on many of these rows: the check is what makes it exact
    rough = (h.bfloat16() @ screen[0].T).topk(k, -1).indices
    assert (rough.sort(1).values != want.indices.sort(1).values).any(1).sum() > 30


def test_a_bfloat16_backward_leaves_the_forward_exact_and_the_gradient_close(tiny):
    """Calibration's default on a CPU: the loss a user sees is float32's to the bit, its gradient a few
    thousandths off, and the model is itself again after."""
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    teacher = adapter.delta_weights()
    batch = base.encode(WORDS, 16)
    objective = TokenKL(base, teacher, 8)
    target = objective.target(batch)

    def loss_and_grad():
        student = {n: (0.3 * d).requires_grad_() for n, d in teacher.items()}
        loss = objective.loss(batch, target, student)
        return loss.detach(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(student.values()))])

    loss, grad = loss_and_grad()
    with base.bfloat16_backward():
        low_loss, low_grad = loss_and_grad()
    assert torch.equal(low_loss, loss)
    assert not torch.equal(low_grad, grad) and (low_grad - grad).norm() < 0.02 * grad.norm()
    again = loss_and_grad()
    assert torch.equal(again[0], loss) and torch.equal(again[1], grad)


def test_a_delta_given_by_its_factors_acts_and_trains_as_the_dense_delta(tiny):
    """Calibration hands the model each ΔW as its factors (its gradient is then two thin products): the
    outputs, the loss and the factors' gradients are the dense ΔW's, with either backward, and no hook
    outlives the call."""
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    batch = base.encode(WORDS, 16)
    objective = TokenKL(base, adapter.delta_weights(), 8)
    target = objective.target(batch)
    plain = base.hidden(batch, {})

    def loss_and_grad(low_rank: bool):
        factors = {n: [(0.3 * t).requires_grad_() for t in m.folded()] for n, m in adapter.modules.items()}
        dense = {n: (b @ a).T if adapter.modules[n].transposed else b @ a for n, (b, a) in factors.items()}
        deltas = {n: LowRank(b, a) for n, (b, a) in factors.items()} if low_rank else dense
        loss = objective.loss(batch, target, deltas)
        grads = torch.autograd.grad(loss, [t for f in factors.values() for t in f])
        return loss.detach(), torch.cat([g.flatten() for g in grads])

    for bf16 in (False, True):
        with base.bfloat16_backward(bf16):
            (dense_loss, dense_grad), (low_loss, low_grad) = loss_and_grad(False), loss_and_grad(True)
        torch.testing.assert_close(low_loss, dense_loss, rtol=1e-5, atol=1e-7)
        assert (low_grad - dense_grad).norm() < (0.02 if bf16 else 1e-4) * dense_grad.norm()
    deltas = adapter.delta_weights()
    factors = {n: LowRank(*m.folded()) for n, m in adapter.modules.items()}
    torch.testing.assert_close(base.forward(batch, factors), base.forward(batch, deltas), rtol=1e-5, atol=1e-5)
    assert torch.equal(base.hidden(batch, {}), plain)


def test_the_bfloat16_backward_is_automatic_only_on_cpus_that_multiply_bfloat16():
    assert bfloat16_flags("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert bfloat16_flags("Features\t: fp asimd sve bf16 i8mm\n")
    assert not bfloat16_flags("flags\t\t: fpu sse2 avx2 avx512f avx512bw\nmodel name\t: bf16 in a name\n")
    assert CalibrationSettings().backward == "auto"
    with pytest.raises(SettingError, match="backward"):
        CalibrationSettings(backward="half").check()


@pytest.mark.parametrize("k", [0, 4, 96])
def test_the_kl_loss_is_zero_at_the_teacher_and_positive_away_from_it(tiny, k):
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    teacher = adapter.delta_weights()
    batch = base.encode(WORDS, 16)
    loss = TokenKL(base, teacher, k)
    target = loss.target(batch)
    assert abs(float(loss.loss(batch, target, teacher))) < 1e-5  # float32 rounding of the same logits
    assert float(loss.loss(batch, target, {})) > 1e-4  # the adapter's measured effect is there to be learned


def test_causal_calibration_runs_end_to_end_and_keeps_more_on_held_out_text(tiny, tmp_path):
    base_dir, lora = tiny
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(f"w{i} w{i + 1} w{i + 2} w{i + 3} w{i + 5} w{i + 8}" for i in range(60)))
    report = lora2vb(
        lora,
        tmp_path / "o",
        FitSettings(num_vectors=16, vector_length=32, iters=2, refine_steps=10),
        base=base_dir,
        texts=texts,
        calibration=CalibrationSettings(steps=30, samples=48, batch_size=8, max_length=16),
    )
    cal = report.calibration
    assert cal.objective == "top-64 KL" and cal.heldout_samples == 6
    assert cal.retention_after.kl_retention > cal.retention_before.kl_retention
    assert report.verdict is not None and report.verdict.retention is not None


def test_lm_retention_of_the_adapter_and_of_nothing(tiny):
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    same = retention(base, WORDS, adapter.delta_weights(), adapter.delta_weights(), 16)
    assert same.kl_retention == pytest.approx(1.0) and same.top1_agreement == 1.0
    assert same.perplexity["teacher"] == pytest.approx(same.perplexity["candidate"])
    assert same.effect_retention is None and same.tokens == sum(len(w.split()) for w in WORDS)
    none = retention(base, WORDS, adapter.delta_weights(), {}, 16)
    assert none.kl_retention == pytest.approx(0.0, abs=1e-6)
    assert none.perplexity["candidate"] == pytest.approx(none.perplexity["base"])


def test_a_probe_measures_the_same_with_or_without_its_teacher_cache(tiny):
    # the floor ladder and the benchmarks measure many candidates against one probe: keeping the teacher's
    # log-probs between them must change the time only, never a figure
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    teacher = adapter.delta_weights()
    kept, fresh = Probe(base, WORDS, teacher, 16, batch_size=2), Probe(base, WORDS, teacher, 16, batch_size=2, cache_bytes=0)
    kept.measure({})
    first = next(iter(kept._teacher.values()))
    part = Probe(base, WORDS, teacher, 16, batch_size=2, cache_bytes=first.numel() * first.element_size())
    for scale in (0.3, 0.7, 0.3, 1.0):
        cand = {n: scale * d for n, d in teacher.items()}
        assert kept.measure(cand) == fresh.measure(cand) == part.measure(cand)
    assert (len(kept._teacher), len(part._teacher), len(fresh._teacher)) == (2, 1, 0)


def test_data_free_text_is_sampled_from_the_teacher_and_leaves_the_base_untouched(tiny):
    base_dir, lora = tiny
    adapter = load_adapter(lora)
    base = Base(base_dir, adapter)
    before = {k: v.clone() for k, v in base.params.items()}
    settings = CalibrationSettings(samples=8, max_length=16)
    with_teacher, label = calibration_texts(base, None, settings, seed=0, teacher=adapter.delta_weights())
    plain, plain_label = calibration_texts(base, None, settings, seed=0)
    assert label == "data-free: samples of the base with the adapter" and plain_label == "data-free: samples of the base model"
    assert len(with_teacher) == 8 and with_teacher != plain
    assert all(torch.equal(before[k], v) for k, v in base.params.items())


def refuses_before_training(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(fit, "fit_bank", no_training)
    monkeypatch.setattr("vbcompress.bank.pipeline.fit_bank", no_training)


def test_bad_causal_inputs_are_refused_before_training(tiny, tmp_path, monkeypatch):
    base_dir, lora = tiny
    refuses_before_training(monkeypatch)
    bare = tiny_causal_base(tmp_path / "bare", special=False)
    with pytest.raises(FormatError, match="neither a pad nor an eos token"):
        lora2vb(lora, tmp_path / "o", base=bare)
    long = tmp_path / "long.txt"
    long.write_text("w1 w2\n" + " ".join(f"w{i % 90 + 1}" for i in range(40)) + "\n")
    with pytest.raises(FormatError, match=r"long\.txt: sample 2 is 40 tokens, longer than the model's context of 32"):
        lora2vb(lora, tmp_path / "o", base=base_dir, texts=long, calibration=CalibrationSettings(max_length=16))
    with pytest.raises(VBCompressError, match="max_length 64 is longer than the model's context of 32"):
        lora2vb(lora, tmp_path / "o", base=base_dir, texts=CALIBRATION)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"w1 w2\n\x00\x01\xff\xfe")
    with pytest.raises(FormatError, match="not UTF-8 text"):
        lora2vb(lora, tmp_path / "o", base=base_dir, texts=binary, calibration=CalibrationSettings(max_length=16))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(FormatError, match="no calibration text"):
        lora2vb(lora, tmp_path / "o", base=base_dir, texts=tmp_path / "empty.txt", calibration=CalibrationSettings(max_length=16))
    assert not (tmp_path / "o").exists()


# --- the real causal base ---------------------------------------------------------------------------

GEMMA_FIT = FitSettings(num_vectors=256, vector_length=128, iters=5, refine_steps=60)  # calibration is under test, not the fit
GEMMA_CAL = CalibrationSettings(steps=6, samples=24, max_length=32, batch_size=8)


@pytest.fixture(scope="module")
def gemma_calibrated(gemma_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma") / "vb"
    return out, lora2vb(GEMMA_ADAPTER, out, GEMMA_FIT, base=gemma_base, calibration=GEMMA_CAL, texts=CALIBRATION)


@pytest.mark.slow
def test_gemma_calibration_keeps_more_of_the_next_token_distribution(gemma_calibrated):
    out, report = gemma_calibrated
    cal = report.calibration
    assert cal.objective == "top-64 KL" and cal.heldout_samples == 3
    assert cal.retention_after.kl_retention > cal.retention_before.kl_retention + 0.1
    saved = json.loads((out / REPORT_FILE).read_text())["calibration"]["retention_after"]
    assert set(saved["perplexity"]) == {"base", "teacher", "candidate"}
    assert saved["kl_retention"] == pytest.approx(cal.retention_after.kl_retention) and 0 < saved["top1_agreement"] <= 1


@pytest.mark.slow
def test_gemma_eval_reports_lm_fidelity_on_text_never_calibrated_on(gemma_calibrated, gemma_base, tmp_path):
    out, _ = gemma_calibrated
    data = tmp_path / "held.txt"
    data.write_text("\n".join(read_texts(HELDOUT)[:3]))
    itself = evaluate(GEMMA_ADAPTER, GEMMA_ADAPTER, base=gemma_base, data=data).function
    assert itself.kl_retention == pytest.approx(1.0) and itself.top1_agreement == 1.0
    assert itself.perplexity["teacher"] == pytest.approx(itself.perplexity["candidate"])
    ours = evaluate(GEMMA_ADAPTER, out, base=gemma_base, data=data).function
    assert 0.3 < ours.kl_retention < 1 and ours.perplexity["base"] == pytest.approx(itself.perplexity["base"])
