"""The quality floor of a collection: no adapter lands below it, each is held in the fewest bytes that meet
it, and what the collection says about an adapter is what a loader gets back."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vbcompress import FitSettings, QualitySettings, load_adapter, write_peft_lora
from vbcompress.baselines import truncation
from vbcompress.cli import main
from vbcompress.collection import Collection, add, pack
from vbcompress.errors import SettingError
from vbcompress.metrics import delta_errors

from .conftest import ADAPTERS, MINILM_ADAPTER

FAST = FitSettings(num_vectors=64, vector_length=128, iters=4, refine_steps=30, code_refine_steps=10)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """An adapter of the MiniLM base that shares nothing with the real one: random factors of the same shapes."""
    root = tmp_path_factory.mktemp("stranger")
    adapter = load_adapter(MINILM_ADAPTER)
    gen = torch.Generator().manual_seed(7)
    for m in adapter.modules.values():
        m.A = torch.randn(m.A.shape, generator=gen) * m.A.std()
        m.B = torch.randn(m.B.shape, generator=gen) * m.B.std()
    write_peft_lora(adapter, root / "stranger")
    return root / "stranger"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    out = tmp_path_factory.mktemp("floor") / "c"
    pack([MINILM_ADAPTER], out, FAST)
    return out


def copy_of(collection, tmp_path):
    import shutil

    shutil.copytree(collection, tmp_path / "c")  # tmp_path / "c" may not exist yet
    return tmp_path / "c"


def test_an_unlike_adapter_is_never_landed_below_the_floor(collection, stranger, tmp_path):
    root = copy_of(collection, tmp_path)
    (entry,) = add(root, [stranger], fit=FAST, quality=QualitySettings(max_error=0.3)).added
    # what a user gets back, measured independently of what the manifest says
    unpacked = Collection(root).unpack([entry.name], tmp_path / "u").paths[0]
    measured = delta_errors(load_adapter(stranger), load_adapter(unpacked)).total_rel_error
    assert measured <= 0.3 and entry.rel_error == pytest.approx(measured, abs=1e-4)
    # the bank shares nothing with random factors: they are held as plain factors, and the entry says so
    assert entry.codec == "lowrank" and any(t["codec"] == "bank" and not t["met"] for t in entry.tried)


def test_the_default_floor_keeps_half_of_every_adapter(collection, stranger, tmp_path):
    root = copy_of(collection, tmp_path)
    (entry,) = add(root, [stranger], fit=FAST).added
    assert entry.floor == "ΔW error ≤ 0.5" and entry.rel_error <= 0.5


@pytest.mark.slow
def test_the_floor_is_met_in_no_more_bytes_than_plain_truncation_needs(collection, tmp_path):
    source = load_adapter(ADAPTERS / "minilm-l6-contract-r4")
    root = copy_of(collection, tmp_path)
    (entry,) = add(root, [ADAPTERS / "minilm-l6-contract-r4"], fit=FAST, quality=QualitySettings(max_error=0.25)).added
    # an independent truncation at each bit width: the cheapest that meets 0.25 bounds what the collection pays
    cheapest = min(
        t.bytes
        for bits in (16, 8, 4)
        for budget in range(1, source.fp16_bytes() + 1, 512)
        if (t := truncation(source.modules.values(), budget, bits)).rank and t.rel_error <= 0.25
    )
    assert entry.rel_error <= 0.25 and entry.codes_bytes <= cheapest * 1.06  # packing granularity and group padding


def test_bank_only_refuses_what_the_bank_cannot_hold_and_leaves_the_collection(collection, stranger, tmp_path):
    root = copy_of(collection, tmp_path)
    manifest = (root / "collection.json").read_bytes()
    with pytest.raises(SettingError, match=r"no representation within its own fp16 size keeps ΔW error ≤ 0.3.*closest, bank codes"):
        add(root, [stranger], fit=FAST, quality=QualitySettings(max_error=0.3, hold="bank"))
    assert (root / "collection.json").read_bytes() == manifest and not (root / "adapters" / "stranger").exists()


def test_floor_settings_are_checked_before_any_work(collection, stranger):
    for quality, match in (
        (QualitySettings(max_error=0), r"max_error must be in \(0, 1\]"),
        (QualitySettings(max_error=1.5), r"max_error must be in \(0, 1\]"),
        (QualitySettings(min_kl_retention=0.9), "measured on a base model"),
    ):
        with pytest.raises(SettingError, match=match):
            add(collection, [stranger], quality=quality)
    from vbcompress import CalibrationSettings

    from .conftest import MINILM_BASE

    with pytest.raises(SettingError, match="warm_steps must not be negative"):  # 0 is allowed: the search without short runs
        add(collection, [stranger], base=MINILM_BASE, calibration=CalibrationSettings(warm_steps=-1))


def test_cli_says_how_each_adapter_is_held_and_refuses_in_one_line(collection, stranger, tmp_path):
    root = copy_of(collection, tmp_path)
    result = CliRunner().invoke(main, ["add", str(root), str(stranger), "--max-error", "0.3", "--code-refine-steps", "5"])
    assert result.exit_code == 0, result.output
    assert "held as int" in result.stdout or "held as fp16" in result.stdout
    assert "plain factors keep more here" in result.stdout
    info = json.loads(CliRunner().invoke(main, ["inspect", str(root), "--json"]).stdout)
    assert info["adapters"]["stranger"]["codec"] == "lowrank"
    assert "factors r=" in CliRunner().invoke(main, ["inspect", str(root)]).stdout
    untouched = copy_of(collection, tmp_path / "again")
    refused = CliRunner().invoke(main, ["add", str(untouched), str(stranger), "--hold", "bank", "--max-error", "0.3"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "--max-error" in refused.stderr
    missing_base = CliRunner().invoke(main, ["add", str(root), str(stranger), "--min-kl-retention", "0.9"])
    assert missing_base.exit_code == 2 and "--min-kl-retention" in missing_base.stderr and "--base" in missing_base.stderr


def test_low_rank_entries_load_in_peft_as_lora_with_the_stated_error(collection, stranger, minilm, tmp_path):
    from peft import PeftModel

    from .conftest import outputs_with_delta

    root = copy_of(collection, tmp_path)
    (entry,) = add(root, [stranger], fit=FAST, quality=QualitySettings(max_error=0.3)).added
    report = Collection(root).unpack([entry.name], tmp_path / "u")
    assert report.written_as == ["dense LoRA"]
    config = json.loads((report.paths[0] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    _, fresh, batch = minilm
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(fresh(), str(report.paths[0])).eval()(**batch).last_hidden_state
    torch.testing.assert_close(theirs, outputs_with_delta(fresh, batch, Collection(root).adapter(entry.name)), rtol=1e-4, atol=1e-5)
    with pytest.raises(SettingError, match="held as low-rank factors"):
        Collection(root).load_peft(fresh(), [entry.name])


def test_base_names_are_compared_by_model_not_by_path(collection, tmp_path):
    adapter = load_adapter(MINILM_ADAPTER)
    adapter.base_model = "/content/drive/MyDrive/models/all-MiniLM-L6-v2"  # the collection says sentence-transformers/…
    write_peft_lora(adapter, tmp_path / "local-path")
    root = copy_of(collection, tmp_path)
    assert add(root, [tmp_path / "local-path"], fit=FAST).added
    other = load_adapter(MINILM_ADAPTER)
    other.base_model = "sentence-transformers/all-MiniLM-L12-v2"
    write_peft_lora(other, tmp_path / "other-model")
    with pytest.raises(Exception, match="allow_mixed_bases"):
        add(root, [tmp_path / "other-model"], fit=FAST)


@pytest.mark.parametrize("name", ["gemma3-270m-ner-r16", "minilm-l6-bias-st"])
def test_the_low_rank_ladder_states_the_error_its_stored_factors_have(name):
    """Every point of the front a collection chooses from is what storing those factors keeps: the ΔW error of
    the decoded codec tensors, computed densely apart from the ladder's Gram arithmetic."""
    from vbcompress.codec.lowrank import LOWRANK
    from vbcompress.collection.hold import hold_lowrank
    from vbcompress.collection.ladder import lowrank_front

    source = load_adapter(ADAPTERS / name)
    front = lowrank_front(source)
    assert [t.bytes for t in front] == sorted(t.bytes for t in front) and len({t.bits for t in front}) > 1
    errors = [t.rel_error for t in front]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)  # a front: more bytes, less error
    want = {n: m.delta_weight().double() for n, m in source.modules.items()}
    norm = sum(float(w.square().sum()) for w in want.values())
    for t in front[:: max(1, len(front) // 6)] + front[-1:]:
        tensors, table = hold_lowrank(source, t.rank, t.bits, t.ranks)
        got = LOWRANK.decode(tensors, table, None, 0)
        if t.ranks is not None:
            assert [r for *_, r in table["modules"]] == t.ranks and max(t.ranks) == t.rank
        err = sum(float((got[n].delta_weight().double() - w).square().sum()) for n, w in want.items())
        assert t.rel_error == pytest.approx((err / norm) ** 0.5, rel=1e-5, abs=1e-7), (t.rank, t.bits)
        assert t.bytes == LOWRANK.stored_bytes(tensors)


def test_ranks_chosen_per_module_never_keep_less_than_one_rank_for_all():
    """At every byte budget the ladder's best is at least as good as one rank for every module (which it also
    holds), and on a real adapter with unequal modules strictly better somewhere; such an entry says so."""
    from vbcompress.collection.ladder import lowrank_front
    from vbcompress.units import held_name

    source = load_adapter(ADAPTERS / "gemma3-270m-attn-r4")
    full, uniform = lowrank_front(source), lowrank_front(source, per_module=False)

    def best(front, budget):
        return min((t.rel_error for t in front if t.bytes <= budget), default=None)

    budgets = sorted({t.bytes for t in uniform + full})
    pairs = [(best(full, b), best(uniform, b)) for b in budgets if best(uniform, b) is not None]
    assert all(f <= u + 1e-9 for f, u in pairs)
    assert any(f < u - 0.05 for f, u in pairs)
    assert any(t.ranks is not None for t in full)
    assert held_name("lowrank", 4, 3, per_module=True) == "int3 factors r≤4"


@pytest.mark.parametrize("order", ["top", "cheapest", "top-cheapest"])
def test_the_floor_search_finds_the_cheapest_rung_that_meets(order):
    """Whatever rung first meets the floor, the search returns it (None when none does), in a bisection's attempts.
    From the top, a ladder that misses everywhere costs one attempt; cheapest first, a ladder whose first rung meets
    costs one; top then cheapest (calibrated codes: one full training run, the rest from it), two."""
    from vbcompress.collection.hold import Tried, first_met

    for n in range(0, 10):
        for need in range(0, n + 2):  # rungs ≥ need meet; need == n + 1 (or n): none does
            tried = []

            def attempt(i, need=need, tried=tried):
                tried.append(i)
                return Tried("bank", i + 1, None, i, None, met=i >= need)

            got = first_met(n, attempt, order=order)
            assert got == (need if need < n else None), (n, need)
            assert len(tried) <= (1 if order == "top" else 2) + max(n - 1, 1).bit_length()
            if not n:
                continue
            if order == "cheapest" and need == 0:
                assert tried == [0]
            if order != "cheapest":
                assert tried[0] == n - 1
                if need >= n:
                    assert tried == [n - 1]
            if order == "top-cheapest" and need == 0:
                assert tried == [n - 1, 0][: min(n, 2)]
    with pytest.raises(ValueError, match="unknown search order"):
        first_met(3, lambda i: None, order="middle")


@pytest.mark.parametrize("warm", [True, False])
def test_a_calibrated_rank_search_starts_each_lower_rank_from_a_higher_ranks_trained_codes(collection, warm):
    """Calibration is what a calibrated rank search spends its time on: past the top rank (from its weight fit, in
    full), every rank tried, rank 1 first, starts from the trained codes of the nearest higher rank already tried,
    sliced, for a short run; each try records where it started. Without ``warm``, every rank starts from its weight fit."""
    from vbcompress.bank.pipeline import fit_settings_for, run_fit
    from vbcompress.codec.layout import VBCode
    from vbcompress.collection.hold import Calibrate, Judge, choose, sliced

    source = load_adapter(MINILM_ADAPTER)
    bank = Collection(collection).bank
    codes = run_fit({m: mod.folded() for m, mod in source.modules.items()}, fit_settings_for([source], FAST), None, bank=bank).codes
    calls = []  # (rank, short run, the codes given, the codes returned)

    def train(trial, short):
        # a stand-in for training: the same ΔW with each mixture's order reversed, so a slice of it is recognisable
        out = {n: VBCode(*(t.flip(-1) for t in (c.indices_A, c.weights_A, c.indices_B, c.weights_B))) for n, c in trial.items()}
        calls.append((next(iter(trial.values())).rank, short, trial, out))
        return out

    def same(a, b):
        return all(torch.equal(getattr(a[n], f), getattr(b[n], f)) for n in a for f in ("indices_A", "weights_A", "indices_B", "weights_B"))

    top = next(iter(codes.values())).rank
    errors = [delta_errors(source, load_adapter_codes(source, bank, sliced(codes, r))).total_rel_error for r in (1, top)]
    quality = QualitySettings(max_error=sum(errors) / 2, hold="bank")  # between rank 1 and the top: a search
    holding = choose("minilm", source, Judge(source, quality), quality, (bank, 2, codes), Calibrate(train, warm))

    assert [c[0] for c in calls[:2]] == [top, 1] and len(calls) >= 3
    for i, (rank, short, given, _) in enumerate(calls):
        done = {r: out for r, _, _, out in calls[:i]}
        above = min((q for q in done if q > rank), default=None) if warm else None
        if above is None:
            assert not short and same(given, sliced(codes, rank))
        else:
            assert short and same(given, sliced(done[above], rank))
        tried = next(t for t in holding.tried if t.codec == "bank" and t.rank == rank)
        assert tried.warm_from == above
    assert any(t.warm_from for t in holding.tried) == warm


def load_adapter_codes(source, bank, codes):
    """The adapter that bank codes decode to (for the floor's reference errors)."""
    from vbcompress.adapter import Adapter
    from vbcompress.codec.bank import BANK
    from vbcompress.collection.hold import hold_bank

    tensors, table = hold_bank(source, codes, bank, 2)
    return Adapter(modules=BANK.decode(tensors, table, bank, 2), source=source.source)


def test_low_rank_tables_written_before_b_rows_read_as_written(tmp_path):
    """Collections written before 0.2 hold B of low-rank entries as [out, r] row-major (no "B_rows" in the
    table): they decode to exactly what was stored. New entries name the side Bt, so a reader that knows only the
    old layout refuses them instead of misreading; a table that says B_rows in a way no version writes is refused."""
    from vbcompress.baselines import dequantize, quantize_levels
    from vbcompress.codec.lowrank import LOWRANK, pack_bits
    from vbcompress.collection.hold import hold_lowrank
    from vbcompress.errors import FormatError

    source = load_adapter(MINILM_ADAPTER)
    tensors, table = hold_lowrank(source, 2, 4)
    assert table["B_rows"] is True
    old_table = {k: v for k, v in table.items() if k != "B_rows"}
    with pytest.raises(FormatError, match="do not match the module table"):  # what a reader before B_rows says
        LOWRANK.check(tensors, old_table, tmp_path, None, 0)
    old = {k: t for k, t in tensors.items() if ".Bt." not in k}
    want = {}
    for name, m in source.modules.items():
        b = m.balanced(2)[0]
        levels, scales = quantize_levels(b, 4)
        old[f"lowrank.{name}.B.levels"], old[f"lowrank.{name}.B.scales"] = pack_bits(levels, 4), scales
        want[name] = dequantize(levels, scales, tuple(b.shape))
    decoded = LOWRANK.decode(old, old_table, None, 0)
    assert all(torch.equal(decoded[name].B, b) for name, b in want.items())
    LOWRANK.check(old, old_table, tmp_path, None, 0)
    with pytest.raises(FormatError, match="B_rows must be true or false"):
        LOWRANK.check(tensors, {**table, "B_rows": "yes"}, tmp_path, None, 0)


@pytest.mark.slow
def test_a_calibrated_add_keeps_what_it_says_on_held_out_text(collection, tmp_path):
    """With a base, an added adapter is held to retention on held-out text: the entry states what it keeps,
    and the adapter the collection gives back keeps exactly that, measured apart on the same texts; bank
    codes are calibrated with the bank frozen (the collection's other adapters read back unchanged). Its rank-1
    codes miss this floor: ranks below the top start from a higher rank's calibrated codes, and say so."""
    from vbcompress import CalibrationSettings
    from vbcompress.bank.calibrate import heldout_split
    from vbcompress.basemodel import Base, read_texts
    from vbcompress.retention import retention

    from .conftest import MINILM_BASE, REPO

    root = copy_of(collection, tmp_path)
    before = {n: Collection(root).adapter(n).delta_weights() for n in Collection(root).names}
    sibling = load_adapter(MINILM_ADAPTER)  # a sibling of the collection's adapter: what a bank can hold
    gen = torch.Generator().manual_seed(3)
    for m in sibling.modules.values():
        m.A = m.A + 0.3 * m.A.std() * torch.randn(m.A.shape, generator=gen)
    write_peft_lora(sibling, tmp_path / "sibling")
    texts, cal = REPO / "examples" / "text" / "calibration.txt", CalibrationSettings(code_steps=40, samples=64)
    floor = 0.385  # rank 1 keeps 0.333, rank 2 0.453, rank 8 0.498 (measured)
    quality = QualitySettings(min_kl_retention=floor, hold="bank")
    (entry,) = add(root, [tmp_path / "sibling"], fit=FAST, base=MINILM_BASE, texts=texts, calibration=cal, quality=quality).added
    assert entry.codec == "bank" and entry.calibrated and entry.retention >= floor and entry.floor == f"retention ≥ {floor:g}"
    tried = {t["rank"]: t for t in entry.tried}
    top = max(tried)  # the one full calibration; rank 1, which misses, and every rank tried after start from it
    assert tried[top]["warm_from"] is None and not tried[1]["met"] and tried[1]["warm_from"] == top and tried[entry.rank]["met"]
    assert all(t["warm_from"] is None or t["warm_from"] > r for r, t in tried.items()) and entry.rank > 1
    assert any(t["warm_from"] for t in tried.values())
    source = load_adapter(tmp_path / "sibling")
    held, _ = heldout_split(read_texts(texts), cal, torch.Generator().manual_seed(FAST.seed))
    stored = Collection(root).adapter(entry.name)
    kept = retention(Base(MINILM_BASE, source), held, source.delta_weights(), stored.delta_weights(), cal.max_length)
    assert kept.headline == pytest.approx(entry.retention, abs=1e-5)
    for n, deltas in before.items():
        assert all(torch.equal(d, Collection(root).adapter(n).delta_weights()[k]) for k, d in deltas.items())


def test_an_untrained_adapter_added_with_a_base_lands_as_what_it_is(collection, tmp_path):
    """PEFT saves lora_B = 0 at initialisation: such an adapter does nothing, so with a base there is no effect to
    retain. It lands held by plain factors that do nothing either (never by bank codes, which would add an effect,
    nor by vectors grown for it), its retention stated as not measurable, as without a base a zero ΔW is no error."""
    from vbcompress import CalibrationSettings

    from .conftest import MINILM_BASE, REPO

    root = copy_of(collection, tmp_path)
    zero = load_adapter(MINILM_ADAPTER)
    for m in zero.modules.values():
        m.B = torch.zeros_like(m.B)
    write_peft_lora(zero, tmp_path / "zero")
    texts, cal = REPO / "examples" / "text" / "calibration.txt", CalibrationSettings(code_steps=5, samples=32)
    (entry,) = add(root, [tmp_path / "zero"], fit=FAST, base=MINILM_BASE, texts=texts, calibration=cal).added
    assert entry.codec == "lowrank" and entry.retention is None and entry.floor == "retention ≥ 0.5"
    assert "ΔW is zero" in entry.verdict["line"]
    assert not any(bool(d.any()) for d in Collection(root).adapter(entry.name).delta_weights().values())
    assert [t["codec"] for t in entry.tried] == ["lowrank"]  # no codes tried, no vectors grown for it
    (plain,) = add(copy_of(collection, tmp_path / "plain"), [tmp_path / "zero"], fit=FAST).added  # without a base: the same
    assert plain.held_as == entry.held_as and plain.rel_error is None
    with pytest.raises(SettingError, match=r"ΔW is zero .* \(hold auto or lowrank\)"):
        add(copy_of(collection, tmp_path / "bank"), [tmp_path / "zero"], fit=FAST, quality=QualitySettings(hold="bank"))


@pytest.mark.slow
def test_a_calibrated_pack_trains_one_bank_on_what_every_adapter_does(tmp_path):
    """With a base, pack trains its bank in function space on all its adapters (each against its own teacher,
    never on its held-out texts) before holding each: every adapter's held-out retention rises over the
    weight-fitted bank, and the written collection keeps what each entry states."""
    from vbcompress import CalibrationSettings
    from vbcompress.bank.shared import calibrate_shared
    from vbcompress.basemodel import Base
    from vbcompress.collection.encode import Judging, joint_fit, load_source
    from vbcompress.collection.hold import sliced
    from vbcompress.retention import retention

    from .conftest import MINILM_BASE, REPO

    sibling = load_adapter(MINILM_ADAPTER)
    gen = torch.Generator().manual_seed(3)
    for m in sibling.modules.values():
        m.A = m.A + 0.5 * m.A.std() * torch.randn(m.A.shape, generator=gen)
    write_peft_lora(sibling, tmp_path / "sibling")
    sources = [MINILM_ADAPTER, tmp_path / "sibling"]
    texts, cal = REPO / "examples" / "text" / "calibration.txt", CalibrationSettings(steps=16, code_steps=20, samples=32)
    fit = FitSettings(num_vectors=32, vector_length=128, iters=4, refine_steps=30)

    # the library step: one bank, two teachers
    loaded = [load_source(s, None, None) for s in sources]
    loaded[1].name = "sibling"
    bank, codes, run = joint_fit([s.adapter for s in loaded], fit)
    model = Base(MINILM_BASE, loaded[0].adapter)
    judging = Judging(QualitySettings(), model, texts, cal)
    calibrations = [judging.calibration_for(s, run.seed) for s in loaded]
    trained, trained_codes, report = calibrate_shared(calibrations, bank, codes, run.topk)
    assert report.steps == 16 and report.last_loss < report.first_loss
    from vbcompress.bank.calibrate import BankModel
    from vbcompress.codec.layout import VectorBank

    for c, before_codes, after_codes in zip(calibrations, codes, trained_codes):
        with torch.no_grad():
            before = BankModel(VectorBank(bank, run.topk, before_codes), c.source).deltas()
            after = BankModel(VectorBank(trained, run.topk, after_codes), c.source).deltas()
        kept = [retention(model, c.held, c.teacher, d, cal.max_length).headline for d in (before, after)]
        assert kept[1] > kept[0]

    # the command: pack --base trains the bank first, records it, and each entry keeps what it states
    quality = QualitySettings(min_kl_retention=0.2, hold="bank")
    summary = pack(
        sources, tmp_path / "c", fit, names=["bias-st", "sibling"], base=MINILM_BASE, texts=texts, calibration=cal, quality=quality
    )
    assert summary.settings["calibrated_bank_steps"] == 16
    for name, source in zip(["bias-st", "sibling"], sources):
        entry = summary.entries[name]
        assert entry.codec == "bank" and entry.retention >= 0.2
        adapter = load_adapter(source)
        held = judging.calibration_for(loaded[0] if name == "bias-st" else loaded[1], run.seed).held
        stored = Collection(tmp_path / "c").adapter(name)
        kept = retention(Base(MINILM_BASE, adapter), held, adapter.delta_weights(), stored.delta_weights(), cal.max_length)
        assert kept.headline == pytest.approx(entry.retention, abs=1e-5)
        # and it holds the codes the shared training gave it, not codes retrained alone against the frozen bank after
        own = trained_codes[0 if name == "bias-st" else 1]
        with torch.no_grad():
            as_trained = BankModel(VectorBank(trained, run.topk, sliced(own, entry.rank)), adapter).deltas()
        assert kept.headline == pytest.approx(
            retention(model, held, adapter.delta_weights(), as_trained, cal.max_length).headline, abs=2e-4
        )
